"""The FedAvg baseline beside `fedlatent distill`: same engine, partition, initial weights and client schedule."""
from __future__ import annotations

import json

import pytest

from fedlatent.apps.distill import distill_federated
from fedlatent.compare import compare
from fedlatent.errors import FedLatentError
from fedlatent.fl.run import read_metrics
from fedlatent.fl.simulation import simulate

TINY = dict(clients=2, participation=0.5, rounds=2, local_epochs=1, batch_size=64, model="convnet:width=8",
            surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2, train_epochs=2, seed=3)


def test_baseline_is_fedavg_on_the_same_run(tmp_path):
    res = distill_federated(out=tmp_path / "r", progress=False, **TINY)
    folder = tmp_path / "r" / "baseline"
    base = read_metrics(folder / "metrics.csv")
    # an independent FedAvg run with the distill run's FLConfig gives the same numbers: same partition,
    # schedule (client_ids) and initial weights (round 0)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    from fedlatent.apps.distill import private_training_data
    from fedlatent.data import load_dataset

    data, _ = private_training_data(load_dataset("digits", resize=16), "digits")  # what the clients of the run hold
    ref = simulate("fedavg", data=data, progress=False, **cfg)
    assert [r["accuracy"] for r in base] == pytest.approx([r["accuracy"] for r in ref.history], abs=1e-12)
    main = read_metrics(tmp_path / "r" / "metrics.csv")
    assert [str(r["client_ids"]) for r in main] == [str(r["client_ids"]) for r in base]
    c = res.comparison
    assert c == compare(main, base)
    assert c.gain == pytest.approx(main[-1]["accuracy"] - base[-1]["accuracy"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "feddgm vs fedavg" in report and f"{100 * c.gain:+.2f} accuracy points" in report
    assert "gain over fedavg" in res.comparison_info()
    assert "fedavg" in res.line()
    # resuming the finished run reads the complete baseline folder back instead of rerunning it
    again = distill_federated(resume=tmp_path / "r", progress=False)
    assert again.comparison == c
    assert json.loads((tmp_path / "r" / "config.json").read_text())["distill"]["baseline"] == "fedavg"


def test_baseline_none_and_bad_name(tmp_path):
    res = distill_federated(out=tmp_path / "n", progress=False, baseline="none", **{**TINY, "rounds": 1})
    assert res.comparison is None and not (tmp_path / "n" / "baseline").exists()
    assert "fedavg" not in (tmp_path / "n" / "report.md").read_text()
    with pytest.raises(FedLatentError, match="unknown baseline"):
        distill_federated(out=tmp_path / "x", baseline="fedprox2", **TINY)

