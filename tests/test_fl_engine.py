"""The simulation engine: schedule, determinism, byte accounting, rejected uploads, run folder, CLI."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fedlatent.data import load_digits
from fedlatent.fl import FedAvg, FedProx, FLConfig, client_schedule, clients_per_round, run_simulation, simulate
from fedlatent.fl.base import ClientData, FLContext, Upload, get_method
from fedlatent.fl.run import read_metrics
from fedlatent.utils import FedLatentError

MODEL = "convnet:width=16"


@pytest.fixture(scope="module")
def tiny():
    d = load_digits(resize=8)
    return dataclasses.replace(d, x_train=d.x_train[:240], y_train=d.y_train[:240],
                               x_test=d.x_test[:100], y_test=d.y_test[:100])


def _cfg(**kw) -> FLConfig:
    base = dict(clients=4, rounds=2, participation=0.5, model=MODEL, batch_size=32, alpha=1.0, min_size=5, seed=3)
    base.update(kw)
    return FLConfig(**base)


def _csv_without_timing(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    drop = {rows[0].index("round_s"), rows[0].index("wall_s")}
    return [[v for i, v in enumerate(r) if i not in drop] for r in rows]


# --- schedule ---------------------------------------------------------------------------------

def test_schedule_is_seeded_sized_and_independent_of_round_count():
    s1 = client_schedule(20, 30, 0.3, seed=5)
    s2 = client_schedule(20, 30, 0.3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(s1, s2))
    assert all(len(a) == 6 and len(set(a.tolist())) == 6 and a.min() >= 0 and a.max() < 20 for a in s1)
    assert all(np.array_equal(a, np.sort(a)) for a in s1)
    assert all(np.array_equal(a, b) for a, b in zip(client_schedule(20, 10, 0.3, seed=5), s1))  # prefix
    assert any(not np.array_equal(a, b) for a, b in zip(s1, client_schedule(20, 30, 0.3, seed=6)))
    assert clients_per_round(10, 0.01) == 1 and clients_per_round(10, 1.0) == 10 and clients_per_round(80, 0.4) == 32
    assert len(client_schedule(7, 3, 0.01, seed=0)[0]) == 1
    # rounds differ from one another (not the same draw every round)
    assert len({tuple(a.tolist()) for a in s1}) > 1


# --- determinism and run folder ---------------------------------------------------------------

def test_same_seed_same_metrics_and_different_seed_different_partition(tiny, tmp_path):
    r1 = run_simulation(FedAvg(), tiny, _cfg(), tmp_path / "a", progress=False)
    run_simulation(FedAvg(), tiny, _cfg(), tmp_path / "b", progress=False)
    run_simulation(FedAvg(), tiny, _cfg(seed=4), tmp_path / "c", progress=False)
    assert _csv_without_timing(tmp_path / "a/metrics.csv") == _csv_without_timing(tmp_path / "b/metrics.csv")
    assert (tmp_path / "a/partition.csv").read_text() == (tmp_path / "b/partition.csv").read_text()
    assert (tmp_path / "a/partition.csv").read_text() != (tmp_path / "c/partition.csv").read_text()
    for f in ("config.json", "metrics.csv", "accuracy.png", "partition.csv", "partition.png", "summary.json"):
        assert (tmp_path / "a" / f).is_file(), f
    rows = read_metrics(tmp_path / "a/metrics.csv")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["clients"] == 0 and all(r["clients"] == 2 for r in rows[1:])
    # the schedule in the CSV is the pre-drawn one
    sched = client_schedule(4, 2, 0.5, seed=3)
    assert [str(r["client_ids"]).split() for r in rows[1:]] == [[str(c) for c in s] for s in sched]
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"] == r1.final_accuracy
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert cfg["method"] == "fedavg" and cfg["config"]["seed"] == 3 and cfg["config"]["model"] == MODEL
    with pytest.raises(FedLatentError, match="already exists"):
        run_simulation(FedAvg(), tiny, _cfg(), tmp_path / "a", progress=False)


def test_byte_accounting_and_eval_schedule(tiny):
    res = run_simulation(FedAvg(), tiny, _cfg(rounds=3, eval_every=2), None, progress=False)
    nbytes = sum(v.numel() * v.element_size() for v in res.strategy.eval_model().state_dict().values())
    for r in res.history[1:]:
        assert r["uplink_bytes"] == r["downlink_bytes"] == 2 * nbytes
    assert res.uplink_bytes == 3 * 2 * nbytes
    assert [r["round"] for r in res.history if r["accuracy"] is not None] == [0, 2, 3]


def test_client_results_do_not_depend_on_execution_order(tiny):
    """Clients run in reverse order (as a parallel back end might) give exactly the same run."""
    def reversed_map(fn, jobs):
        jobs = list(jobs)
        out = [fn(*args) for args in reversed(jobs)]
        return out[::-1]

    a = run_simulation(FedAvg(), tiny, _cfg(participation=1.0), None, progress=False)
    b = run_simulation(FedAvg(), tiny, _cfg(participation=1.0), None, progress=False, client_map=reversed_map)
    keys = ["accuracy", "loss", "train_loss", "client_ids", "uplink_bytes"]
    assert [[r.get(k) for k in keys] for r in a.history] == [[r.get(k) for k in keys] for r in b.history]


def test_initial_weights_are_seeded(tiny):
    a = run_simulation(FedAvg(), tiny, _cfg(rounds=0), None, progress=False).strategy.eval_model()
    b = run_simulation(FedAvg(), tiny, _cfg(rounds=0), None, progress=False).strategy.eval_model()
    c = run_simulation(FedAvg(), tiny, _cfg(rounds=0, seed=9), None, progress=False).strategy.eval_model()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --- strategies and bad clients ---------------------------------------------------------------

class _Corrupting(FedAvg):
    """FedAvg whose listed clients upload NaN weights."""

    def __init__(self, bad: set[int] | None = None):
        self.bad = bad

    def client_update(self, ctx, rnd, client_id, payload, data):
        up = super().client_update(ctx, rnd, client_id, payload, data)
        if self.bad is None or client_id in self.bad:
            k = next(iter(up.tensors))
            up.tensors[k] = torch.full_like(up.tensors[k], float("nan"))
        return up


def test_rejected_uploads_are_counted_and_all_rejected_keeps_global_model(tiny):
    sched = client_schedule(4, 2, 0.5, seed=3)
    bad = {int(sched[0][0])}
    res = run_simulation(_Corrupting(bad), tiny, _cfg(), None, progress=False)
    r1 = res.history[1]
    assert r1["rejected"] == 1 and r1["accepted"] == 1
    assert res.rejected == sum(int(c in bad) for s in sched for c in s)
    assert res.rejections[0]["round"] == 1 and "NaN" in res.rejections[0]["reason"]

    strat = _Corrupting(None)
    res = run_simulation(strat, tiny, _cfg(), None, progress=False)
    init = FLContext(_cfg(), 10, 1, 8, [], [0] * 4).build_model()  # same seed -> the initial weights
    final = strat.eval_model().state_dict()
    assert all(torch.equal(final[k], v) for k, v in init.state_dict().items())
    assert [r["accuracy"] for r in res.history] == [res.history[0]["accuracy"]] * 3
    assert all(r["accepted"] == 0 for r in res.history[1:])


def _ctx(tiny, **kw) -> FLContext:
    return FLContext(_cfg(**kw), tiny.num_classes, tiny.channels, tiny.image_size, tiny.classes, [60] * 4)


def test_client_update_is_pure_and_fedprox_limits_drift(tiny):
    ctx = _ctx(tiny, local_epochs=3, lr=0.05)
    s = FedAvg()
    s.setup(ctx)
    payload = s.client_payload(1, 0)
    before = {k: v.clone() for k, v in payload.items()}
    data = ClientData(0, tiny.x_train[:60], tiny.y_train[:60])
    u1 = s.client_update(ctx, 1, 0, payload, data)
    u2 = s.client_update(ctx, 1, 0, payload, data)
    assert isinstance(u1, Upload) and u1.num_samples == 60 and u1.client_id == 0
    assert all(torch.equal(u1.tensors[k], u2.tensors[k]) for k in u1.tensors)
    assert all(torch.equal(payload[k], before[k]) for k in before)
    assert not all(torch.equal(u1.tensors[k], before[k]) for k in before)  # it did train
    assert set(u1.tensors) == set(s.expected_upload(0))

    def drift(u):
        return sum(float((u.tensors[k] - before[k]).pow(2).sum()) for k in before) ** 0.5

    prox = FedProx(mu=10.0)
    prox.setup(ctx)
    assert drift(prox.client_update(ctx, 1, 0, payload, data)) < 0.5 * drift(u1)
    # mu = 0 is exactly FedAvg
    u0 = FedProx(mu=0.0).client_update(ctx, 1, 0, payload, data)
    assert all(torch.equal(u0.tensors[k], u1.tensors[k]) for k in u1.tensors)


def test_strategy_state_roundtrip_and_registry(tiny):
    ctx = _ctx(tiny)
    a, b = FedAvg(), FedAvg()
    a.setup(ctx)
    b.setup(dataclasses.replace(ctx, config=_cfg(seed=11)))
    b.load_state_dict(a.state_dict())
    sa, sb = a.eval_model().state_dict(), b.eval_model().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert get_method("fedavg") is FedAvg and get_method("fedprox") is FedProx
    with pytest.raises(FedLatentError, match="unknown federated method"):
        get_method("no-such-method")
    with pytest.raises(FedLatentError):
        FedProx(mu=-1)


def test_heterogeneous_eval_dict_reports_each_model_and_mean(tiny):
    class TwoModels(FedAvg):
        def setup(self, ctx):
            super().setup(ctx)
            self.other = ctx.build_model(key="other")

        def eval_model(self):
            return {"g": self.model, "o": self.other}

    res = run_simulation(TwoModels(), tiny, _cfg(rounds=1), None, progress=False)
    r = res.history[-1]
    assert r["accuracy"] == pytest.approx((r["accuracy_g"] + r["accuracy_o"]) / 2)


def test_simulate_api_rejects_bad_options(tiny):
    with pytest.raises(FedLatentError, match="unknown simulation option"):
        simulate(data=tiny, rounds=1, no_such_option=3, progress=False)
    with pytest.raises(FedLatentError, match="participation"):
        simulate(data=tiny, participation=0.0, progress=False)
    with pytest.raises(FedLatentError, match="bad options for method"):
        simulate(method="fedavg", data=tiny, method_options={"mu": 1.0}, rounds=1, progress=False)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_writes_run_folder_and_refuses_to_overwrite(tmp_path):
    from fedlatent.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--method", "fedprox", "--mu", "0.1", "--clients", "3", "--rounds", "1",
            "--participation", "0.34", "--model", MODEL, "--image-size", "8", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for f in ("config.json", "metrics.csv", "accuracy.png", "summary.json", "partition.csv"):
        assert (out / f).is_file(), f
    assert "final accuracy" in res.output and str(out) in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "fedprox" and cfg["method_options"] == {"mu": 0.1}
    before = (out / "metrics.csv").read_text()
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 2 and "already exists" in res2.output
    assert (out / "metrics.csv").read_text() == before
    res3 = CliRunner().invoke(main, [*args, "--overwrite"])
    assert res3.exit_code == 0, res3.output
    bad = CliRunner().invoke(main, ["simulate", "--method", "fedavg", "--mu", "0.1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fedprox" in bad.output
    helptext = CliRunner().invoke(main, ["simulate", "--help"]).output
    for opt in ("--participation", "--local-epochs", "--classes-per-client", "--eval-every", "--overwrite"):
        assert opt in helptext


def test_metrics_writer_grows_columns_and_leaves_no_temp_files(tmp_path):
    from fedlatent.fl.run import MetricsWriter, RunFolder, plot_curves

    w = MetricsWriter(tmp_path / "m.csv", columns=["round", "accuracy"])
    w.append({"round": 0, "accuracy": 0.5})
    w.append({"round": 1, "accuracy": None, "distill_loss": 0.25})
    rows = read_metrics(tmp_path / "m.csv")
    assert rows == [{"round": 0.0, "accuracy": 0.5, "distill_loss": None},
                    {"round": 1.0, "accuracy": None, "distill_loss": 0.25}]
    plot_curves({"a": w.rows, "b": [{"round": 0, "accuracy": 0.1}]}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "p.png"]
    # overwrite removes the old run's files only
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FedLatentError):
        RunFolder(tmp_path)
    RunFolder(tmp_path, overwrite=True)
    assert not (tmp_path / "summary.json").exists() and (tmp_path / "notes.txt").read_text() == "keep me"
