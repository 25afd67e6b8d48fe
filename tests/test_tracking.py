"""Experiment trackers (--log): parsing, and TensorBoard / MLflow logs read back with each library's own reader."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fedlatent import tracking
from fedlatent.fl.run import read_metrics
from fedlatent.utils import FedLatentError

MODEL = "convnet:width=4"
RUN = dict(clients=3, rounds=2, participation=1.0, model=MODEL, batch_size=32, min_size=5, seed=2, local_epochs=1)


@pytest.fixture(scope="module")
def tiny():
    from fedlatent.data import load_digits

    d = load_digits(resize=8)
    return dataclasses.replace(d, x_train=d.x_train[:150], y_train=d.y_train[:150], x_test=d.x_test[:60],
                               y_test=d.y_test[:60])


@pytest.fixture(autouse=True)
def _local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_parse_log():
    assert tracking.parse_log(None) == ("csv",)
    assert tracking.parse_log("tensorboard") == ("csv", "tensorboard")
    assert tracking.parse_log(" MLflow , csv,tensorboard,mlflow") == ("csv", "mlflow", "tensorboard")
    assert tracking.parse_log(["csv", "mlflow"]) == ("csv", "mlflow")
    with pytest.raises(FedLatentError, match="unknown tracker 'wandb'.*csv, tensorboard, mlflow"):
        tracking.parse_log("csv,wandb")


def test_flatten_and_numeric_metrics():
    flat = tracking.flatten({"config": {"lr": 0.1, "model": "convnet", "x": [1, 2]}, "empty": {}, "seed": 3})
    assert flat == {"config.lr": "0.1", "config.model": "convnet", "config.x": "[1, 2]", "empty": "{}", "seed": "3"}
    row = {"round": 2, "accuracy": 0.5, "loss": float("nan"), "client_ids": "0 1", "train_loss": None, "ok": True}
    assert tracking.numeric_metrics(row) == {"accuracy": 0.5}


def test_csv_only_creates_nothing(tmp_path):
    t = tracking.open(tmp_path / "run", "csv", {"a": 1})
    assert not t and t.names == ("csv",)
    t.log_metrics({"round": 1, "accuracy": 0.5})
    t.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_read_back(tmp_path, tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedlatent.fl import simulate

    res = simulate(data=tiny, out=tmp_path / "run", progress=False, log="tensorboard", **RUN)
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    acc = [(e.step, e.value) for e in ea.Scalars("accuracy")]
    assert [s for s, _ in acc] == [0, 1, 2]
    assert [v for _, v in acc] == pytest.approx([r["accuracy"] for r in rows], rel=1e-6)
    assert acc[-1][1] == pytest.approx(res.final_accuracy, rel=1e-6)
    assert "loss" in ea.Tags()["scalars"] and "client_ids" not in ea.Tags()["scalars"]
    assert {"accuracy", "partition"} <= set(ea.Tags()["images"])  # the PNGs of the run folder
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["config"]["clients"] == 3


def test_mlflow_file_store_read_back(tmp_path, tiny):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedlatent.fl import simulate

    res = simulate(data=tiny, out=tmp_path / "run", progress=False, log="mlflow", **RUN)
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("fedlatent")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["config.clients"] == "3" and run.data.params["method"] == "fedavg"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy"))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert hist == [(int(r["round"]), pytest.approx(r["accuracy"])) for r in rows]
    assert hist[-1][1] == pytest.approx(res.final_accuracy)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"accuracy.png", "metrics.csv", "config.json", "summary.json"} <= arts


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(FedLatentError, match=r"pip install 'fedlatent\[mlflow\]'"):
        tracking.open(tmp_path, "csv,mlflow")


def test_cli_rejects_unknown_tracker_before_training(tmp_path):
    from click.testing import CliRunner

    from fedlatent.cli import main

    r = CliRunner().invoke(main, ["simulate", "--rounds", "1", "--log", "csv,wandb", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown tracker 'wandb'" in r.output
    assert not (tmp_path / "x").exists()


def test_resumed_distill_run_continues_its_trackers(tmp_path, monkeypatch):
    """Killed in round 2 and resumed: one MLflow run with every round once; TensorBoard holds each step once."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import fedlatent.fl.feddgm as fd

    opts = dict(clients=2, participation=1.0, rounds=3, local_epochs=1, batch_size=64, model="convnet:width=4",
                surrogate="convnet:width=4", ipc=1, iterations=1, syn_steps=2, train_epochs=1, seed=1)
    real, calls = fd.local_train, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # second client of round 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fd, "local_train", dying)
    with pytest.raises(KeyboardInterrupt):
        fd.distill_federated(out=tmp_path / "run", progress=False, log="tensorboard,mlflow", **opts)
    monkeypatch.setattr(fd, "local_train", real)
    fd.distill_federated(resume=tmp_path / "run", progress=False, log="tensorboard,mlflow")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedlatent").experiment_id])
    assert run.info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy"))
    assert hist == [(int(r["round"]), pytest.approx(r["accuracy"])) for r in rows]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"distilled.safetensors", "report.md", "accuracy.png", "grid_round3.png"} <= arts
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("accuracy")] == [0, 1, 2, 3]
