"""FedDF: ensemble teacher, KD loss, per-architecture FedAvg, distillation, transfer sets, end-to-end runs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from fedlatent.fl import FLConfig, simulate
from fedlatent.fl.aggregate import fedavg
from fedlatent.fl.base import FLContext, Upload
from fedlatent.fl.feddf import FedDF, distill, ensemble_logits, kd_loss, model_logits
from fedlatent.fl.run import read_metrics
from fedlatent.fl.transfer import load_distilled_set, load_transfer_set
from fedlatent.models import get_model
from fedlatent.utils import FedLatentError

A, B = "convnet:width=8", "convnet:width=4,depth=2"
MIX = f"{A}@0.5;{B}@0.5"


@pytest.fixture(scope="module")
def small(digits16):
    return dataclasses.replace(digits16, x_train=digits16.x_train[:400], y_train=digits16.y_train[:400],
                               x_test=digits16.x_test[:150], y_test=digits16.y_test[:150])


def _ctx(client_models, public_x=None, seed=0) -> FLContext:
    cfg = FLConfig(clients=len(client_models), model=client_models[0], seed=seed)
    return FLContext(config=cfg, num_classes=10, channels=1, image_size=16, class_names=[str(i) for i in range(10)],
                     client_sizes=[50] * len(client_models), client_models=list(client_models), public_x=public_x,
                     mean=(0.5,), std=(0.5,))


def _model(spec, seed):
    torch.manual_seed(seed)
    return get_model(spec, 1, 10, 16)


# --- pure functions -----------------------------------------------------------------------------

def test_ensemble_logits_is_the_mean_of_the_models_logits():
    x = torch.randn(37, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    models = [_model(A, 1), _model(B, 2), _model(A, 3)]
    want = sum(m.eval()(x).double() for m in models) / 3
    got = ensemble_logits(models, x, batch_size=10)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    assert got.shape == (37, 10) and got.dtype == torch.float32
    torch.testing.assert_close(ensemble_logits(models[:1], x), models[0](x), rtol=0, atol=1e-6)
    with pytest.raises(FedLatentError):
        ensemble_logits([], x)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_loss_zero_at_teacher_and_gradient_is_analytic(T):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g)
    assert float(kd_loss(t.clone(), t, T)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    loss = kd_loss(s, t, T)
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s.detach() / T, 1)
    explicit = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T  # T^2 KL(p_t || p_s), batch mean
    assert float(loss.detach()) == pytest.approx(float(explicit), rel=1e-5) and float(loss.detach()) > 0
    loss.backward()
    torch.testing.assert_close(s.grad, T * (p_s - p_t) / 6, rtol=1e-4, atol=1e-6)
    # the teacher is a constant
    t2, s2 = t.clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    kd_loss(s2, t2, T).backward()
    assert t2.grad is None or float(t2.grad.abs().sum()) == 0.0
    with pytest.raises(FedLatentError):
        kd_loss(s, t, 0.0)


def test_distill_moves_student_toward_teacher_and_early_stopping_keeps_best():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 16, 16, generator=g)
    xv = torch.randn(32, 1, 16, 16, generator=g)
    teacher_model = _model(A, 7)
    t, tv = model_logits(teacher_model, x), model_logits(teacher_model, xv)
    student = _model(A, 8)
    before = float(kd_loss(model_logits(student, xv), tv))
    r = distill(student, x, t, steps=60, lr=1e-2, batch_size=32, x_val=xv, teacher_val=tv, val_every=10, patience=100,
                generator=torch.Generator().manual_seed(1))
    after = float(kd_loss(model_logits(student, xv), tv))
    assert r["steps"] == 60 and after < 0.5 * before
    assert r["val_kd"] == pytest.approx(after, rel=1e-5) and r["val_kd_start"] == pytest.approx(before, rel=1e-5)
    # a diverging run (absurd lr) stops after `patience` checks and restores the initial (best) student
    bad = _model(A, 9)
    init = {k: v.clone() for k, v in bad.state_dict().items()}
    r2 = distill(bad, x, t, steps=100, lr=50.0, batch_size=32, x_val=xv, teacher_val=tv, val_every=5, patience=2,
                 generator=torch.Generator().manual_seed(1))
    assert r2["steps"] == 10
    assert all(torch.equal(init[k], v) for k, v in bad.state_dict().items())


# --- the strategy -------------------------------------------------------------------------------

def _uploads(ctx, strategy, cids, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, cid in enumerate(cids):
        spec = strategy.expected_upload(cid)
        tensors = {k: (torch.randn(shape, generator=g) * 0.1).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt)
                   for k, (shape, dt) in spec.items()}
        out.append(Upload(cid, tensors, num_samples=10 + 7 * i))
    return out


def test_per_architecture_fedavg_only_averages_same_architecture_clients():
    ctx = _ctx([A, B, A, B, A])
    s = FedDF(distill_steps=0)
    s.setup(ctx)
    ups = _uploads(ctx, s, [0, 1, 2, 4])  # client 3 (arch B) not in this round
    s.aggregate(1, ups)
    want_a = fedavg([u.tensors for u in ups if u.client_id in (0, 2, 4)], [u.num_samples for u in ups if u.client_id in (0, 2, 4)])
    want_b = ups[1].tensors  # the only B upload
    for k, v in s.students[A].state_dict().items():
        assert torch.equal(v, want_a[k]), k
    for k, v in s.students[B].state_dict().items():
        assert torch.equal(v, want_b[k]), k
    # an architecture without uploads keeps its weights
    before = {k: v.clone() for k, v in s.students[B].state_dict().items()}
    s.aggregate(2, [u for u in _uploads(ctx, s, [0, 2], seed=1)])
    assert all(torch.equal(before[k], v) for k, v in s.students[B].state_dict().items())


def test_teacher_is_mean_of_all_received_models_across_architectures():
    pub = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = _ctx([A, B, A], public_x=pub)
    s = FedDF(distill_steps=2, val_fraction=0.25, val_every=1, distill_batch_size=8)
    s.setup(ctx)
    ups = _uploads(ctx, s, [0, 1, 2], seed=5)
    s.aggregate(1, ups)
    models = []
    for u in ups:
        m = get_model(ctx.arch_of(u.client_id), 1, 10, 16)
        m.load_state_dict(u.tensors)
        models.append(m.eval())
    manual = torch.stack([m(pub) for m in models]).mean(0)
    torch.testing.assert_close(s.teacher_logits, manual, rtol=0, atol=1e-6)
    assert len(s.val_idx) == 10 and len(s.train_idx) == 30
    assert set(s.val_idx.tolist()).isdisjoint(s.train_idx.tolist())


# --- transfer sets ----------------------------------------------------------------------------

def test_distilled_set_file_checks(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "syn.safetensors"
    save_file({"images": torch.randn(20, 1, 16, 16), "labels": torch.arange(20) % 10}, str(f))
    ts = load_distilled_set(f, channels=1, image_size=16, num_classes=10)
    assert ts.x.shape == (20, 1, 16, 16) and ts.y.tolist() == (torch.arange(20) % 10).tolist()
    ctx = _ctx([A])
    assert len(load_transfer_set(f"file:{f}", ctx)) == 20 and len(load_transfer_set(str(f), ctx, size=8)) == 8
    save_file({"images": torch.randn(4, 3, 16, 16)}, str(tmp_path / "rgb.safetensors"))
    save_file({"x": torch.randn(4, 1, 16, 16)}, str(tmp_path / "nokey.safetensors"))
    save_file({"images": torch.randn(4, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 11])}, str(tmp_path / "lab.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, msg in [("rgb", "dataset is 1x16x16"), ("nokey", "no 'images'"), ("lab", "outside"),
                      ("junk", "not a readable"), ("missing", "not found")]:
        with pytest.raises(FedLatentError, match=msg):
            load_distilled_set(tmp_path / f"{name}.safetensors", channels=1, image_size=16, num_classes=10)
    with pytest.raises(FedLatentError, match="public-fraction"):
        load_transfer_set("public", ctx)
    with pytest.raises(FedLatentError, match="unknown transfer set"):
        load_transfer_set("imagenet", ctx)


def test_generator_transfer_set(tmp_path):
    from fedlatent.generators import BuiltinConfig, BuiltinStyleGenerator, save_builtin

    torch.manual_seed(0)
    G = BuiltinStyleGenerator(BuiltinConfig(img_resolution=16, img_channels=1, c_dim=10, z_dim=8, w_dim=16,
                                            embed_dim=8, channel_base=64, channel_max=8))
    path = tmp_path / "g.safetensors"
    save_builtin(G, path)
    ctx = _ctx([A])
    a = load_transfer_set(f"generator:{path}", ctx, size=25)
    b = load_transfer_set(f"generator:{path}", ctx, size=25)
    assert a.x.shape == (25, 1, 16, 16) and torch.equal(a.x, b.x) and torch.isfinite(a.x).all()
    assert a.y.tolist() == [i % 10 for i in range(25)]
    lo, hi = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5  # [0, 1] in the normalised space of mean 0.5, std 0.5
    assert float(a.x.min()) >= lo - 1e-6 and float(a.x.max()) <= hi + 1e-6


# --- end to end -------------------------------------------------------------------------------

def test_feddf_end_to_end_writes_per_architecture_columns_and_counts_bytes(small, tmp_path):
    res = simulate(method="feddf", data=small, out=tmp_path / "run", progress=False,
                   method_options={"distill_steps": 20, "val_every": 5, "distill_batch_size": 32},
                   clients=4, rounds=2, participation=0.5, model=A, client_models=MIX, public_fraction=0.2,
                   alpha=1.0, min_size=5, batch_size=32, seed=1)
    rows = read_metrics(tmp_path / "run/metrics.csv")
    labels = ("convnet_width8", "convnet_width4_depth2")
    for lab in labels:
        assert all(r[f"accuracy_{lab}"] is not None for r in rows)
        assert all(r[f"distill_steps_{lab}"] > 0 for r in rows[1:])
    for r in rows:
        assert r["accuracy"] == pytest.approx(sum(r[f"accuracy_{lab}"] for lab in labels) / 2)
    st = res.strategy
    nbytes = {a: sum(v.numel() * v.element_size() for v in m.state_dict().values()) for a, m in st.students.items()}
    for r in rows[1:]:
        cids = [int(c) for c in str(r["client_ids"]).split()]
        want = sum(nbytes[st.ctx.arch_of(c)] for c in cids)
        assert r["uplink_bytes"] == want and r["downlink_bytes"] == want
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert set(summary["final_accuracy_per_model"]) == set(labels)
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    assert cfg["client_models"]["counts"] == {A: 2, B: 2} or cfg["client_models"]["counts"] == {B: 2, A: 2}
    assert cfg["public_split"]["public"] == 80 and sum(summary["client_sizes"]) == 320


def test_feddf_cli_and_option_errors(tmp_path):
    from fedlatent.cli import main

    out = tmp_path / "cli"
    args = ["simulate", "--method", "feddf", "--clients", "2", "--rounds", "1", "--participation", "1",
            "--model", A, "--client-models", f"{A}@1;{B}@1", "--public-fraction", "0.1", "--transfer", "public",
            "-O", "distill_steps=5", "-O", "val_every=5", "--image-size", "8", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "convnet_width8" in res.output and "accuracy_convnet_width4_depth2" in (out / "metrics.csv").read_text()
    bad = CliRunner().invoke(main, ["simulate", "--method", "fedavg", "--transfer", "public", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "feddf" in bad.output
    nopub = CliRunner().invoke(main, ["simulate", "--method", "feddf", "--rounds", "1", "--out", str(tmp_path / "y")])
    assert nopub.exit_code == 2 and "public-fraction" in nopub.output
    with pytest.raises(FedLatentError):
        FedDF(val_fraction=1.0)


def test_feddf_same_seed_same_history(small):
    def run():
        h = simulate(method="feddf", data=small, progress=False, method_options={"distill_steps": 6, "val_every": 2},
                     clients=4, rounds=2, participation=0.5, model=A, client_models=MIX, public_fraction=0.2,
                     alpha=1.0, min_size=5, seed=4).history
        return [{k: v for k, v in r.items() if k not in ("round_s", "wall_s")} for r in h]

    assert run() == run()
