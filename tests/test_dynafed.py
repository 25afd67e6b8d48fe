"""DynaFed: trajectory buffer, segment targets, one-off synthesis, server fine-tuning, artefacts."""
from __future__ import annotations

import copy
import csv
import dataclasses
import math

import pytest
import torch
from click.testing import CliRunner

from fedlatent.distill import mtt
from fedlatent.fl import FedAvg, FLConfig, run_simulation
from fedlatent.fl import dynafed as dyn
from fedlatent.fl.dynafed import (DynaFed, PseudoSet, Segment, SynthesisConfig, finetune_on_pseudo, load_pseudo_set,
                                  sample_segment, save_pseudo_set, segment_target, synthesize)
from fedlatent.models import get_model
from fedlatent.models.functional import FlatModel
from fedlatent.utils import FedLatentError, numpy_rng, torch_generator

MODEL = "convnet:width=8"
TIMING = {"round_s", "wall_s", "synth_s", "finetune_s"}
# Tiny synthesis: 2 images per class, 3 iterations of 3 student steps over 1-round segments.
FAST = dict(ipc=2, iterations=3, syn_steps=3, expert_epochs=1, finetune_epochs=2, finetune_batch=8, progress=False)


@pytest.fixture(scope="module")
def small(digits16):
    d = digits16
    return dataclasses.replace(d, x_train=d.x_train[:400], y_train=d.y_train[:400],
                               x_test=d.x_test[:150], y_test=d.y_test[:150])


def _cfg(**kw) -> FLConfig:
    base = dict(clients=4, rounds=3, participation=0.5, partition="balanced-dirichlet", alpha=0.1, model=MODEL,
                batch_size=32, seed=7)
    base.update(kw)
    return FLConfig(**base)


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps its flat global weights after setup and after every aggregation."""

    def setup(self, ctx):
        super().setup(ctx)
        self.flats = [FlatModel(self.model).flatten()]
        self.states = [copy.deepcopy(self.model.state_dict())]

    def aggregate(self, rnd, uploads):
        out = super().aggregate(rnd, uploads)
        self.flats.append(FlatModel(self.model).flatten())
        self.states.append(copy.deepcopy(self.model.state_dict()))
        return out


def _rows(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# --- segments -----------------------------------------------------------------------------------

def test_sample_segment_ranges_and_counts():
    starts = set()
    for i in range(300):
        seg = sample_segment(12, 3, numpy_rng(0, "t", i), min_start=1, max_start=6, weight_averaging=True,
                             least_ave_num=2, max_ave_num=10)
        assert seg.start >= 1 and seg.start <= 6
        assert 2 <= len(seg.targets) <= 3 and len(set(seg.targets)) == len(seg.targets)
        assert all(seg.start < t <= seg.start + 3 for t in seg.targets) and list(seg.targets) == sorted(seg.targets)
        starts.add(seg.start)
    assert starts == set(range(1, 7))  # uniform over the whole allowed range
    # the range shrinks to what the trajectory allows: 5 snapshots, E=3 -> start in {0, 1}
    assert {sample_segment(5, 3, numpy_rng(1, i), max_start=50).start for i in range(100)} == {0, 1}
    plain = sample_segment(10, 3, numpy_rng(2), weight_averaging=False)
    assert plain.targets == (plain.start + 3,)
    assert all(len(sample_segment(10, 3, numpy_rng(3, i), least_ave_num=1, max_ave_num=1).targets) == 1 for i in range(20))
    with pytest.raises(FedLatentError, match="at least 4"):
        sample_segment(3, 3, numpy_rng(0))


def test_weight_averaged_target_is_the_exact_mean_of_the_chosen_snapshots():
    g = torch.Generator().manual_seed(0)
    snaps = [torch.randint(-50, 50, (64,), generator=g).float() for _ in range(8)]
    seg = Segment(2, (3, 4, 5))
    expected = (snaps[3].double() + snaps[4].double() + snaps[5].double()) / 3
    assert torch.equal(segment_target(snaps, seg), expected.float())
    assert torch.equal(segment_target(snaps, Segment(1, (4,))), snaps[4])
    rnd = [torch.randn(100, generator=g) for _ in range(4)]
    assert torch.equal(segment_target(rnd, Segment(0, (1, 3))), torch.stack([rnd[1], rnd[3]]).double().mean(0).float())


def test_synthesis_matches_the_sampled_segments(monkeypatch):
    """The start/target handed to the MTT engine are snapshot[start] and the mean of snapshot[targets]."""
    import fedlatent.distill.distiller as engine

    torch.manual_seed(0)
    student = get_model(MODEL, 1, 10, 16)
    base = FlatModel(student).flatten()
    snaps = [base + 0.01 * k * torch.randn(base.shape, generator=torch.Generator().manual_seed(k)) for k in range(7)]
    calls = []
    real = engine.meta_gradient

    def spy(model, start, target, *a, **kw):
        calls.append((start.clone(), target.clone()))
        return real(model, start, target, *a, **kw)

    monkeypatch.setattr(engine, "meta_gradient", spy)
    cfg = SynthesisConfig(ipc=1, iterations=6, syn_steps=2, expert_epochs=3, least_ave_num=2)
    res = synthesize(student, snaps, 10, (1, 16, 16), cfg, seed=3, progress=False)
    assert len(calls) == len(res.segments) == len(res.losses) == 6 and res.failure is None
    assert any(len(s.targets) > 1 for s in res.segments)
    for (start, target), seg in zip(calls, res.segments):
        assert torch.equal(start, snaps[seg.start])
        assert torch.equal(target, torch.stack([snaps[i] for i in seg.targets]).double().mean(0).float())
    assert res.pseudo.images.shape == (10, 1, 16, 16) and res.pseudo.label_logits.shape == (10, 10)
    # the set moved: images, labels (label_init 0 -> uniform at first) and the learned lr
    init = dyn.init_pseudo_set(10, 1, (1, 16, 16), 0.0, cfg.lr_teacher, torch_generator(3, "dynafed", "init"))
    assert not torch.equal(res.pseudo.images, init.images) and not torch.equal(res.pseudo.label_logits, init.label_logits)
    assert res.pseudo.lr != cfg.lr_teacher


def test_learned_lr_gradient_matches_finite_differences():
    """syn_lr (class-mean KD units) drives the student with alpha = syn_lr / K; dL/dsyn_lr = dL/dlog(alpha) / syn_lr."""
    torch.manual_seed(0)
    student = get_model(MODEL, 1, 10, 16).double()
    flat = FlatModel(student)
    start = flat.flatten()
    target = start + 0.05 * torch.randn_like(start)
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.randn(6, 10, dtype=torch.float64)
    plan = mtt.make_plan(6, 3, 6, seed=1, augment=False)
    K, p, h = 10, 0.3, 1e-5

    def run(v):
        return mtt.meta_gradient(flat, start, target, x, y, torch.tensor(math.log(v / K), dtype=torch.float64), plan)

    g = run(p)
    fd = (run(p + h).loss - run(p - h).loss) / (2 * h)
    assert float(g.grad_log_lr) / p == pytest.approx(fd, rel=1e-4)


def test_non_finite_loss_stops_synthesis_and_keeps_the_last_good_set(monkeypatch):
    import fedlatent.distill.distiller as engine

    torch.manual_seed(0)
    student = get_model(MODEL, 1, 10, 16)
    base = FlatModel(student).flatten()
    snaps = [base + 0.01 * k * torch.ones_like(base) for k in range(4)]
    cfg = SynthesisConfig(ipc=1, iterations=5, syn_steps=2, expert_epochs=1)
    ref = synthesize(student, snaps, 10, (1, 16, 16), dataclasses.replace(cfg, iterations=2), seed=5, progress=False)
    calls = {"n": 0}
    real = engine.meta_gradient

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FedLatentError("non-finite loss/gradient in trajectory matching (diverged)")
        return real(*a, **kw)

    monkeypatch.setattr(engine, "meta_gradient", failing)
    res = synthesize(student, snaps, 10, (1, 16, 16), cfg, seed=5, progress=False)
    assert res.failure is not None and "iteration 2" in res.failure and len(res.losses) == 2
    assert torch.equal(res.pseudo.images, ref.pseudo.images) and torch.equal(res.pseudo.label_logits, ref.pseudo.label_logits)
    assert res.pseudo.lr == ref.pseudo.lr
    # failure at the first iteration: no usable set
    calls["n"] = 2
    assert synthesize(student, snaps, 10, (1, 16, 16), cfg, seed=5, progress=False).pseudo is None
    monkeypatch.setattr(engine, "meta_gradient", real)
    # a real divergence (absurd student lr) is caught the same way
    wild = synthesize(student, snaps, 10, (1, 16, 16), dataclasses.replace(cfg, lr_teacher=1e30), seed=5, progress=False)
    assert wild.pseudo is None and "non-finite" in wild.failure


# --- fine-tuning ----------------------------------------------------------------------------------

def test_finetune_fits_the_soft_labels_and_depends_on_the_pseudo_set():
    torch.manual_seed(0)
    model = get_model(MODEL, 1, 3, 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 16, 16, generator=g)
    target = torch.arange(12) % 3
    pseudo = PseudoSet(x, 5.0 * torch.nn.functional.one_hot(target, 3).float(), 0.01)
    before = copy.deepcopy(model)
    first = finetune_on_pseudo(model, pseudo, epochs=1, lr=1e-2, batch_size=4, augment=None, generator=torch_generator(0))
    last = finetune_on_pseudo(model, pseudo, epochs=30, lr=1e-2, batch_size=4, augment=None, generator=torch_generator(1))
    assert last < first
    assert (model(x).argmax(1) == target).float().mean() == 1.0
    # the result is a function of the pseudo set: other labels -> other weights
    other = PseudoSet(x, pseudo.label_logits.roll(1, 1), 0.01)
    m1, m2 = copy.deepcopy(before), copy.deepcopy(before)
    finetune_on_pseudo(m1, pseudo, epochs=1, lr=1e-3, batch_size=4, augment=None, generator=torch_generator(2))
    finetune_on_pseudo(m2, other, epochs=1, lr=1e-3, batch_size=4, augment=None, generator=torch_generator(2))
    assert not torch.equal(FlatModel(m1).flatten(), FlatModel(m2).flatten())
    assert math.isnan(finetune_on_pseudo(m1, pseudo, epochs=0, lr=1e-3, batch_size=4, augment=None,
                                         generator=torch_generator(3)))


# --- the strategy in the engine --------------------------------------------------------------------

def test_buffer_holds_init_and_every_fedavg_aggregate(small):
    ref = RecordingFedAvg()
    run_simulation(ref, small, _cfg(), progress=False)
    d = DynaFed(synth_round=50, **FAST)  # never synthesises within 3 rounds
    res = run_simulation(d, small, _cfg(), progress=False)
    assert len(d.trajectory) == 4 and _same(d.trajectory, ref.flats)
    assert d.pseudo is None and d.synthesized_round is None
    assert _rows(res.history) == _rows(run_simulation(FedAvg(), small, _cfg(), progress=False).history)


def test_synthesis_once_at_round_L_then_finetuning_from_L_on(small, monkeypatch):
    calls = []
    real = dyn.synthesize

    def spy(student, snapshots, *a, **kw):
        calls.append(len(snapshots))
        return real(student, snapshots, *a, **kw)

    monkeypatch.setattr(dyn, "synthesize", spy)
    ref = RecordingFedAvg()
    fed = run_simulation(ref, small, _cfg(rounds=4), progress=False)
    d = DynaFed(synth_round=2, **FAST)
    res = run_simulation(d, small, _cfg(rounds=4), progress=False)
    assert calls == [3]                                        # once, at round 2, from w_0, w_1, w_2
    assert d.synthesized_round == 2 and len(d.trajectory) == 3 and _same(d.trajectory, ref.flats[:3])
    rows = {int(r["round"]): r for r in res.history}
    assert [r for r in rows if rows[r].get("synth_loss") is not None] == [2]
    assert [r for r in rows if rows[r].get("finetune_loss") is not None] == [2, 3, 4]
    frows = {int(r["round"]): r for r in fed.history}
    for r in (0, 1):                                           # before L: exactly FedAvg
        assert rows[r]["accuracy"] == frows[r]["accuracy"] and rows[r]["loss"] == frows[r]["loss"]
    assert rows[4]["loss"] != frows[4]["loss"]


def test_finetuning_replays_exactly_on_the_fedavg_aggregate(small):
    """Round L's global model = FedAvg's aggregate of round L fine-tuned on the pseudo set (seeded)."""
    ref = RecordingFedAvg()
    run_simulation(ref, small, _cfg(rounds=2), progress=False)
    d = DynaFed(synth_round=2, **FAST)
    run_simulation(d, small, _cfg(rounds=2), progress=False)
    model = get_model(MODEL, 1, 10, 16)
    model.load_state_dict(ref.states[2])
    finetune_on_pseudo(model, d.pseudo, epochs=2, lr=d.finetune_lr, batch_size=8,
                       augment=dyn.make_augment(True, d.synth.dsa_strategy),
                       generator=torch_generator(7, "dynafed", "finetune", 2))
    assert torch.equal(FlatModel(model).flatten(), FlatModel(d.model).flatten())
    assert not torch.equal(FlatModel(d.model).flatten(), ref.flats[2])


def test_zero_finetune_epochs_is_exactly_fedavg(small):
    fed = run_simulation(FedAvg(), small, _cfg(rounds=3), progress=False)
    d = DynaFed(synth_round=1, **dict(FAST, finetune_epochs=0))
    res = run_simulation(d, small, _cfg(rounds=3), progress=False)
    assert d.pseudo is not None
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("synth") and k != "syn_lr"}
                          for r in rows]  # noqa: E731
    assert strip(res.history) == strip(fed.history)
    assert torch.equal(FlatModel(d.model).flatten(), FlatModel(fed.strategy.model).flatten())


def test_same_seed_same_metrics_and_state_round_trip(small):
    a = run_simulation(DynaFed(synth_round=1, **FAST), small, _cfg(rounds=2), progress=False)
    b = run_simulation(DynaFed(synth_round=1, **FAST), small, _cfg(rounds=2), progress=False)
    assert _rows(a.history) == _rows(b.history)
    sa, sb = a.strategy, b.strategy
    assert torch.equal(sa.pseudo.images, sb.pseudo.images) and sa.synthesis_loss == sb.synthesis_loss
    c = run_simulation(DynaFed(synth_round=1, **FAST), small, _cfg(rounds=2, seed=8), progress=False)
    assert not torch.equal(sa.pseudo.images, c.strategy.pseudo.images)
    # checkpoint: a fresh strategy restored from state_dict has the same model, buffer and pseudo set
    fresh = DynaFed(synth_round=1, **FAST)
    fresh.setup(sa.ctx)
    fresh.load_state_dict(copy.deepcopy(sa.state_dict()))
    assert _same(fresh.trajectory, sa.trajectory) and fresh.synthesized_round == 1
    assert torch.equal(fresh.pseudo.images, sa.pseudo.images) and torch.equal(fresh.pseudo.label_logits, sa.pseudo.label_logits)
    assert fresh.pseudo.lr == sa.pseudo.lr and fresh.synthesis_loss == sa.synthesis_loss
    assert torch.equal(FlatModel(fresh.model).flatten(), FlatModel(sa.model).flatten())


def test_pseudo_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = PseudoSet(torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, generator=g), 0.0375)
    meta = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "ipc": 2, "synth_round": 4, "seed": 9, "failure": None}
    save_pseudo_set(tmp_path / "p.safetensors", p, meta, losses=[1.0, 0.5])
    q, m, losses = load_pseudo_set(tmp_path / "p.safetensors")
    assert torch.equal(q.images, p.images) and torch.equal(q.label_logits, p.label_logits)
    assert q.lr == pytest.approx(0.0375) and m == meta and losses == [1.0, 0.5]
    from safetensors.torch import load_file
    assert torch.allclose(load_file(str(tmp_path / "p.safetensors"))["soft_labels"], torch.softmax(p.label_logits, 1))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(FedLatentError, match="not a readable"):
        load_pseudo_set(tmp_path / "bad.safetensors")


def test_end_to_end_simulate_and_cli_write_the_artefacts(tmp_path, small):
    from fedlatent.cli.simulate import simulate as simulate_cmd
    from fedlatent.fl import simulate

    res = simulate("dynafed", data=small, out=tmp_path / "run", progress=False, method_options=dict(FAST, synth_round=2),
                   clients=4, rounds=3, participation=0.5, partition="balanced-dirichlet", alpha=0.1, model=MODEL, seed=7)
    run = tmp_path / "run"
    for name in ("pseudo.safetensors", "pseudo.png", "synthesis_loss.png", "metrics.csv", "summary.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0
    p, meta, losses = load_pseudo_set(run / "pseudo.safetensors")
    assert torch.equal(p.images, res.strategy.pseudo.images) and losses == pytest.approx(res.strategy.synthesis_loss)
    assert meta["synth_round"] == 2 and meta["ipc"] == 2 and meta["seed"] == 7
    assert meta["mean"] == pytest.approx(list(small.mean)) and meta["std"] == pytest.approx(list(small.std))
    with open(run / "metrics.csv", newline="") as f:
        cols = next(csv.reader(f))
    assert {"synth_loss", "finetune_loss", "syn_lr"} <= set(cols)

    out = tmp_path / "cli"
    r = CliRunner().invoke(simulate_cmd, ["--method", "dynafed", "--rounds", "1", "--clients", "3", "--model", MODEL,
                                          "--out", str(out), "-q", "-O", "synth_round=1", "-O", "expert_epochs=1",
                                          "-O", "iterations=1", "-O", "ipc=1", "-O", "syn_steps=1",
                                          "-O", "progress=false"])
    assert r.exit_code == 0, r.output
    assert (out / "pseudo.safetensors").is_file()
    bad = CliRunner().invoke(simulate_cmd, ["--method", "dynafed", "--rounds", "1", "-O", "synth_round=1",
                                            "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "expert_epochs" in str(bad.output) + str(bad.exception)


@pytest.mark.parametrize("kw, msg", [
    (dict(synth_round=2, expert_epochs=3), "synth_round"),
    (dict(ipc=0), ">= 1"),
    (dict(least_ave_num=3, max_ave_num=2), "least_ave_num"),
    (dict(lr_teacher=0.0), "lr_teacher"),
    (dict(mtt_mode="fast"), "mtt_mode"),
    (dict(dsa_strategy="blur"), "unknown DSA"),
    (dict(ipc=2.5), "integer"),
])
def test_bad_options_raise(kw, msg):
    with pytest.raises(FedLatentError, match=msg):
        DynaFed(**kw)
