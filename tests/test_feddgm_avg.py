"""FedDGM+FedAvg (``feddgm+avg``): its aggregate is FedAvg's, the fine-tuning starts there and trains on the pool,
the global model must be the surrogate, and runs are deterministic, resumable and reachable from the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fedlatent.utils import FedLatentError

# Tiny: digits 16 px through the built-in digits generator (space F2), a width-8 ConvNet as model and surrogate.
OPTS = dict(generator="digits", space="F2", surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2,
            progress=False, save_artifacts=False)
RUN = dict(clients=3, participation=1.0, rounds=2, local_epochs=1, batch_size=64, model="convnet:width=8", seed=3)
TIMING = {"round_s", "wall_s", "distill_s", "server_train_s"}
SIZES = (40, 90, 25)  # unequal client sizes: a sample-weighted mean differs from the plain one


def _ctx(digits16, **cfg):
    from fedlatent.fl.base import FLConfig, FLContext

    c = FLConfig(**{"model": "convnet:width=8", "seed": 0, "clients": len(SIZES), **cfg}).check()
    return FLContext(config=c, num_classes=10, channels=1, image_size=16, class_names=list(digits16.classes),
                     client_sizes=list(SIZES), mean=tuple(digits16.mean), std=tuple(digits16.std))


def _round_one(strategy, ctx, digits16):
    """Real client updates of round 1 (clients of sizes SIZES on disjoint slices of the digits)."""
    from fedlatent.fl.base import ClientData

    ups, lo = [], 0
    for cid, n in enumerate(SIZES):
        data = ClientData(cid, digits16.x_train[lo:lo + n], digits16.y_train[lo:lo + n])
        ups.append(strategy.client_update(ctx, 1, cid, strategy.client_payload(1, cid), data))
        lo += n
    return ups


def _weighted_mean(ups):
    """sum_k n_k end_k / sum_k n_k in float64, computed here (not by fedlatent.fl.aggregate)."""
    n = torch.tensor([float(u.num_samples) for u in ups], dtype=torch.float64)
    ends = torch.stack([u.tensors["end"].double() for u in ups])
    return (n[:, None] * ends).sum(0) / n.sum(), ends.mean(0)


def _rows(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def _same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            same = ra[k] == rb[k] or (isinstance(ra[k], float) and math.isnan(ra[k]) and math.isnan(rb[k]))
            assert same, (ra["round"], k, ra[k], rb[k])


# -- the aggregate is FedAvg's -----------------------------------------------------------------------------
def test_without_fine_tuning_the_global_model_is_the_weighted_mean_of_the_ends(digits16):
    """train_epochs 0: after the round the global weights are exactly sum_k n_k end_k / n (float32 rounding of the
    float64 mean), not the plain mean; the distilled pool is FedDGM's for the same uploads."""
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg

    ctx = _ctx(digits16)
    s = FedDGMAvg(**OPTS, train_epochs=0)
    s.setup(ctx)
    sent = s.client_payload(1, 0)["params"].clone()
    ups = _round_one(s, ctx, digits16)
    m = s.aggregate(1, ups)
    expect, plain = _weighted_mean(ups)
    got = s.flat.flatten()
    assert got.dtype == torch.float32 and torch.equal(got, expect.float())
    assert (got.double() - expect).abs().max() <= 1e-7 * expect.abs().max()
    assert not torch.equal(got, plain.float())  # the weights matter in this test
    assert m["fedavg_step"] == pytest.approx(float((expect - sent.double()).norm()), rel=1e-5)
    assert m["finetune_shift"] == 0.0 and math.isnan(m["finetune_loss"]) and m["pool_size"] == 30.0
    d = FedDGM(**OPTS, train_epochs=0)
    d.setup(ctx)
    d.client_payload(1, 0)
    d.aggregate(1, ups)
    assert torch.equal(d.pool.images, s.pool.images) and torch.equal(d.pool.labels, s.pool.labels)
    assert torch.equal(d.flat.flatten(), sent)  # FedDGM without training keeps the old model; the hybrid moved


def test_without_fine_tuning_a_run_is_a_fedavg_run(digits16):
    """The same seed and FLConfig: 'feddgm+avg' with train_epochs 0 and 'fedavg' give the same clients, the same
    local training and the same global model every round (metrics and final weights bit for bit)."""
    from fedlatent.fl.simulation import simulate

    run = dict(RUN, participation=0.67)
    hyb = simulate("feddgm+avg", data=digits16, progress=False, method_options=dict(OPTS, train_epochs=0), **run)
    avg = simulate("fedavg", data=digits16, progress=False, **run)
    for a, b in zip(hyb.history, avg.history):
        for k in ("round", "client_ids", "accepted", "accuracy", "loss", "train_loss", "downlink_bytes"):
            assert a.get(k, "absent") == b.get(k, "absent"), (a["round"], k)
    assert [r["clients"] for r in hyb.history[1:]] == [2, 2] and hyb.history[2]["pool_size"] == 20.0
    ha, fa = hyb.strategy.model.state_dict(), avg.strategy.model.state_dict()
    assert ha.keys() == fa.keys() and all(torch.equal(ha[k], fa[k]) for k in ha)


def _fine_tune_by_hand(s, ctx, start, epochs, lr_at=None):
    """The documented fine-tune written out: a fresh model at ``start``, SGD with the strategy's optimiser fields
    (``lr_at(opt, epoch)`` before each epoch, if given), fit_on_set on the round-1 pool (batch 8, DSA) with the
    round-1 "global" stream. Returns (model, mean loss)."""
    from fedlatent.distill.augment import DSA
    from fedlatent.models.functional import FlatModel
    from fedlatent.train import fit_on_set
    from fedlatent.utils import torch_generator

    ref = ctx.build_model()
    FlatModel(ref).load(start.float())
    opt = torch.optim.SGD(ref.parameters(), lr=s.train_lr, momentum=s.train_momentum, weight_decay=s.train_weight_decay)
    loss = fit_on_set(ref, s.pool.images, s.pool.labels, opt, epochs=epochs, batch_size=8,
                      augment=DSA(s.dsa_strategy, siamese=False),
                      on_epoch=None if lr_at is None else (lambda ep: lr_at(opt, ep)),
                      generator=torch_generator(ctx.config.seed, "feddgm", "train", 1, "global"))
    return ref, loss


# -- the fine-tuning -------------------------------------------------------------------------------------------
def test_fine_tuning_starts_at_the_aggregate_and_trains_on_the_pool(digits16):
    """train_epochs 3: the global model is fit_on_set run from the independently computed weighted mean on the
    round's pool with the documented optimiser and stream, bit for bit; it differs from the aggregate."""
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg
    from fedlatent.models.functional import FlatModel

    ctx = _ctx(digits16)
    s = FedDGMAvg(**OPTS, train_epochs=3, train_batch=8)
    s.setup(ctx)
    ups = _round_one(s, ctx, digits16)
    m = s.aggregate(1, ups)
    expect, _ = _weighted_mean(ups)
    ref, loss = _fine_tune_by_hand(s, ctx, expect, epochs=3)
    got = s.flat.flatten()
    assert torch.equal(got, FlatModel(ref).flatten())
    assert not torch.equal(got, expect.float())
    assert m["finetune_loss"] == loss == m["server_train_loss"] and math.isfinite(loss)
    assert m["finetune_shift"] == pytest.approx(float((got.double() - expect).norm()), rel=1e-6)
    assert m["finetune_shift"] > 0 and m["pool_size"] == 30.0 and m["distill_failed"] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_the_server_lr_schedule_sets_each_epochs_lr(digits16, schedule):
    """train_schedule: every epoch of the fine-tuning runs at train_lr times the schedule's factor, written out
    here (cosine: (1 + cos(pi e / E)) / 2; step: 0.1 from E // 2 + 1), bit for bit; it differs from 'constant'."""
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg
    from fedlatent.models.functional import FlatModel

    E = 5
    factor = {"cosine": lambda e: 0.5 * (1 + math.cos(math.pi * e / E)),
              "step": lambda e: 0.1 if e >= E // 2 + 1 else 1.0}[schedule]
    got = {}
    for sched in ("constant", schedule):  # the scheduled strategy last: its uploads and pool are checked below
        ctx = _ctx(digits16)
        s = FedDGMAvg(**OPTS, train_epochs=E, train_batch=8, train_lr=0.05, train_schedule=sched)
        s.setup(ctx)
        ups = _round_one(s, ctx, digits16)
        s.aggregate(1, ups)
        got[sched] = s.flat.flatten()
    expect, _ = _weighted_mean(ups)
    seen = []

    def by_hand(opt, ep):
        opt.param_groups[0]["lr"] = 0.05 * factor(ep)
        seen.append(opt.param_groups[0]["lr"])

    ref, _ = _fine_tune_by_hand(s, ctx, expect, epochs=E, lr_at=by_hand)
    assert torch.equal(got[schedule], FlatModel(ref).flatten())
    assert not torch.equal(got[schedule], got["constant"])
    assert seen[0] == 0.05 and seen[-1] < 0.05


def test_lr_factor_values_and_a_bad_schedule():
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.train import lr_factor

    assert [lr_factor("constant", e, 4) for e in range(4)] == [1.0] * 4
    assert [lr_factor("step", e, 10) for e in range(10)] == [1.0] * 6 + [0.1] * 4
    assert lr_factor("cosine", 0, 8) == 1.0 and lr_factor("cosine", 4, 8) == pytest.approx(0.5, abs=1e-15)
    assert lr_factor("cosine", 8, 8) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(FedLatentError, match="train_schedule must be one of"):
        FedDGM(train_schedule="linear")
    with pytest.raises(FedLatentError, match="lr schedule must be one of"):
        lr_factor("linear", 0, 4)


def test_forged_starts_are_left_out_of_the_average(digits16):
    """An upload whose start is not the sent model is neither averaged nor distilled."""
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg

    ctx = _ctx(digits16)
    s = FedDGMAvg(**OPTS, train_epochs=0)
    s.setup(ctx)
    ups = _round_one(s, ctx, digits16)
    ups[1].tensors["start"] = ups[1].tensors["start"] + 1.0
    m = s.aggregate(1, ups)
    expect, _ = _weighted_mean([ups[0], ups[2]])
    # float32 rounding of the float64 mean depends on the CPU's summation order; leaving the forged upload in moves
    # the mean by ~0.3, far beyond this tolerance
    torch.testing.assert_close(s.flat.flatten(), expect.float(), rtol=0, atol=1e-6)
    assert m["start_mismatch"] == 1.0 and set(s.pool.clients.tolist()) == {0, 2}


# -- setup, options, CLI --------------------------------------------------------------------------------------
def test_the_global_model_must_be_the_surrogate(digits16, tmp_path):
    from click.testing import CliRunner

    from fedlatent.cli import main
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg

    with pytest.raises(FedLatentError, match="must be the surrogate.*'convnet:width=8'.*'convnet:width=4'"):
        FedDGMAvg(**{**OPTS, "surrogate": "convnet:width=4"}).setup(_ctx(digits16))
    FedDGM(**{**OPTS, "surrogate": "convnet:width=4"}).setup(_ctx(digits16))  # FedDGM trains both: allowed
    r = CliRunner().invoke(main, ["simulate", "--method", "feddgm+avg", "--model", "convnet:width=8", "--rounds", "1",
                                  "-O", "surrogate=convnet:width=4", "-O", "generator=digits", "--out",
                                  str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "must be the surrogate" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


def test_options_are_feddgms_with_dynafeds_fine_tuning_epochs():
    from click.testing import CliRunner

    from fedlatent.cli import main
    from fedlatent.fl.base import get_method
    from fedlatent.fl.methods.feddgm import FedDGMConfig
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg, FedDGMAvgConfig

    assert get_method("feddgm+avg") is FedDGMAvg
    assert FedDGMAvg().config.train_epochs == 8 and FedDGMConfig().train_epochs == 1000
    assert isinstance(FedDGMAvg(ipc=2).config, FedDGMAvgConfig) and FedDGMAvg(ipc=2).options()["train_epochs"] == 8
    with pytest.raises(FedLatentError, match="^feddgm\\+avg: ipc"):
        FedDGMAvg(ipc=0)
    r = CliRunner().invoke(main, ["methods", "feddgm+avg"])
    assert r.exit_code == 0, r.output
    assert "train_epochs : int = 8" in r.output and "DynaFed" in r.output and "ipc : int = 10" in r.output


# -- end to end --------------------------------------------------------------------------------------------------
def test_simulate_writes_the_run_folder_and_is_deterministic(digits16, tmp_path):
    from fedlatent.export import load_distilled
    from fedlatent.fl.run import read_metrics
    from fedlatent.fl.simulation import simulate

    opts = dict(OPTS, train_epochs=2, save_artifacts=True)
    a = simulate("feddgm+avg", data=digits16, out=tmp_path / "a", progress=False, method_options=opts, **RUN)
    b = simulate("feddgm+avg", data=digits16, out=tmp_path / "b", progress=False, method_options=opts, **RUN)
    ra, rb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    _same_rows(_rows(ra), _rows(rb))
    assert [int(r["round"]) for r in ra] == [0, 1, 2]
    for k in ("distill_loss", "pool_size", "server_train_loss", "fedavg_step", "finetune_loss", "finetune_shift"):
        assert math.isfinite(ra[2][k]), k
    assert ra[2]["finetune_shift"] > 0 and ra[2]["pool_size"] == 30
    sa, sb = a.strategy.model.state_dict(), b.strategy.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ds, meta = load_distilled(tmp_path / "a" / "distilled.safetensors")
    assert len(ds) == 30 and meta["extra"]["method"] == "feddgm+avg" and meta["generator"] == "digits"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["method"] == "feddgm+avg" and cfg["method_options"]["train_epochs"] == 2
    assert (tmp_path / "a" / "grid_round2.png").is_file() and (tmp_path / "a" / "model.safetensors").is_file()


def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(digits16, tmp_path):
    """pool='all' makes the pool part of the state: the resumed round 2 fine-tunes on rounds 1 and 2's sets."""
    from fedlatent.fl.base import FLConfig
    from fedlatent.fl.checkpoint import load_checkpoint, resume_state, save_checkpoint
    from fedlatent.fl.methods.feddgm_avg import FedDGMAvg
    from fedlatent.fl.simulation import run_simulation

    opts = dict(OPTS, train_epochs=2, pool="all")
    cfg = FLConfig(**RUN).check()

    def after_round_one(rnd, strategy, engine_state):
        if rnd == 1:
            save_checkpoint(tmp_path, rnd, strategy.state_dict(), engine_state)

    full = run_simulation(FedDGMAvg(**opts), digits16, cfg, progress=False, checkpoint_fn=after_round_one)
    res = run_simulation(FedDGMAvg(**opts), digits16, cfg, progress=False,
                         resume=resume_state(load_checkpoint(tmp_path)))
    _same_rows(_rows(res.history), _rows(full.history))
    assert res.history[2]["pool_size"] == 30 + 30
    a, b = res.strategy, full.strategy
    assert torch.equal(a.pool.images, b.pool.images) and a.round_log == b.round_log
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
