"""Checkpoint/resume: state encoding, RNG states, damaged checkpoints, and a killed FedDGM run resumed to the
same metrics as an uninterrupted one."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedlatent.fl.checkpoint import (capture_rng, decode_state, encode_state, load_checkpoint, restore_rng,
                                     save_checkpoint)
from fedlatent.utils import FedLatentError

TIMING = {"round_s", "wall_s", "distill_s", "server_train_s"}
RUN = dict(clients=3, participation=1.0, rounds=3, local_epochs=1, batch_size=64, model="convnet:width=8",
           surrogate="convnet:width=8", ipc=1, iterations=1, syn_steps=2, train_epochs=1, seed=5)


def test_state_round_trip():
    state = {"model": {"w": torch.randn(3, 4), "b": torch.arange(3)}, "pool": None, "log": [{"round": 1, "x": [1.5, None]}],
             "tup": (1, "a", torch.ones(2)), 3: "int key", "arr": np.arange(4, dtype=np.float32),
             "nan": float("nan"), "dtype": torch.float64}
    tree, tensors = encode_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    import json

    back = decode_state(json.loads(json.dumps(tree)), tensors)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and torch.equal(back["model"]["b"], state["model"]["b"])
    assert back["pool"] is None and back["log"] == state["log"] and back[3] == "int key"
    assert isinstance(back["tup"], tuple) and torch.equal(back["tup"][2], torch.ones(2))
    assert np.array_equal(back["arr"], state["arr"]) and np.isnan(back["nan"]) and back["dtype"] is torch.float64
    with pytest.raises(FedLatentError, match="cannot store"):
        encode_state({"f": lambda: 0})


def test_rng_states_are_restored(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": torch.zeros(1)}, {"history": []})
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(load_checkpoint(tmp_path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect
    assert set(capture_rng()) >= {"python", "numpy", "torch"}


def test_damaged_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FedLatentError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path, 2, {"w": torch.ones(5)}, {"history": [{"round": 1}]})
    assert load_checkpoint(tmp_path)["round"] == 2
    t = folder / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:-3])
    with pytest.raises(FedLatentError, match="damaged"):
        load_checkpoint(tmp_path)
    (folder / "state.json").write_text("{not json")
    with pytest.raises(FedLatentError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, {"r": r}, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round_*")) == ["round_0003", "round_0004"]
    assert load_checkpoint(tmp_path)["strategy"] == {"r": 4}


def _rows(path):
    from fedlatent.fl.run import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_identical_metrics(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import fedlatent.fl.feddgm as fd

    ref = fd.distill_federated(out=tmp_path / "ref", progress=False, **RUN)
    assert ref.resumed_from is None

    real, calls = fd.local_train, {"n": 0}

    def dying(*a, **k):  # 3 clients a round: call 6 is the third client of round 2
        calls["n"] += 1
        if calls["n"] == 6:
            raise Killed("simulated crash after client 2 of round 2")
        return real(*a, **k)

    monkeypatch.setattr(fd, "local_train", dying)
    with pytest.raises(Killed):
        fd.distill_federated(out=tmp_path / "run", progress=False, **RUN)
    monkeypatch.setattr(fd, "local_train", real)
    assert [int(r["round"]) for r in _rows(tmp_path / "run" / "metrics.csv")] == [0, 1]
    with pytest.raises(FedLatentError, match="own options|options of the original"):
        fd.distill_federated(resume=tmp_path / "run", rounds=5)

    res = fd.distill_federated(resume=tmp_path / "run", progress=False)
    assert res.resumed_from == 1
    assert _rows(tmp_path / "run" / "metrics.csv") == _rows(tmp_path / "ref" / "metrics.csv")
    a = load_file(str(tmp_path / "run" / "distilled.safetensors"))
    b = load_file(str(tmp_path / "ref" / "distilled.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "distilled.safetensors").read_bytes() == (tmp_path / "ref" / "distilled.safetensors").read_bytes()
    assert res.final_accuracy == ref.final_accuracy
    assert (tmp_path / "run" / "grid_round3.png").is_file() and (tmp_path / "run" / "report.md").is_file()


def test_resume_without_checkpoint_restarts_and_bad_folders_fail(tmp_path, monkeypatch):
    import fedlatent.fl.feddgm as fd

    opts = dict(RUN, rounds=1)
    real = fd.local_train

    def dying(*a, **k):
        raise Killed("crash in round 1")

    monkeypatch.setattr(fd, "local_train", dying)
    with pytest.raises(Killed):
        fd.distill_federated(out=tmp_path / "run", progress=False, **opts)
    monkeypatch.setattr(fd, "local_train", real)
    res = fd.distill_federated(resume=tmp_path / "run", progress=False)  # no checkpoint yet: from the start
    assert res.resumed_from is None and res.simulation.rounds == 1
    with pytest.raises(FedLatentError, match="not a run folder"):
        fd.distill_federated(resume=tmp_path / "empty")


def test_resumed_run_keeps_the_failures_of_the_rounds_before_the_checkpoint(tmp_path):
    """A client that a parallel runner reports as failed (ClientFailure) in every round: the resumed run's
    failures (and summary) are the uninterrupted run's, not only those after the checkpoint."""
    import dataclasses

    from fedlatent.data import load_digits
    from fedlatent.fl import FedAvg, FLConfig, run_simulation
    from fedlatent.fl.checkpoint import resume_state
    from fedlatent.fl.simulation import ClientFailure

    d = load_digits(resize=8)
    d = dataclasses.replace(d, x_train=d.x_train[:160], y_train=d.y_train[:160], x_test=d.x_test[:50],
                            y_test=d.y_test[:50])
    cfg = FLConfig(clients=3, rounds=2, participation=1.0, model="convnet:width=4", batch_size=32, min_size=5, seed=1)

    def drops_client_1(fn, jobs):
        return [ClientFailure(1, "RuntimeError: lost") if args[2] == 1 else fn(*args) for args in jobs]

    def first_round_only(rnd, strategy, engine_state):
        if rnd == 1:
            save_checkpoint(tmp_path, rnd, strategy.state_dict(), engine_state)

    full = run_simulation(FedAvg(), d, cfg, None, progress=False, client_map=drops_client_1,
                          checkpoint_fn=first_round_only)
    assert [(f["round"], f["client"]) for f in full.failures] == [(1, 1), (2, 1)]
    res = run_simulation(FedAvg(), d, cfg, None, progress=False, client_map=drops_client_1,
                         resume=resume_state(load_checkpoint(tmp_path)))
    assert res.failures == full.failures and res.summary()["failed"] == 2
    assert [r["failed"] for r in res.history] == [0, 1, 1]
