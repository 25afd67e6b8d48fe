"""Flower integration: records round trip, the run config, the strategy on an in-process grid (no Ray), and real
Flower simulations (4 virtual SuperNodes on Ray, 2 rounds) of FedDGM and DynaFed that must reproduce the
in-process engine's metrics exactly (same seed, same partition, same schedule, same uploads)."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr at import; this machine is offline

from fedlatent.utils import FedLatentError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tiny FedDGM (tests/test_feddgm.py's TINY): digits 16 px through the built-in digits generator, space F2.
FEDDGM = dict(generator="digits", space="F2", surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2,
              train_epochs=1)
DYNAFED = dict(synth_round=2, ipc=1, iterations=2, syn_steps=2, expert_epochs=1, finetune_epochs=1, finetune_batch=8)
COMMON = dict(participation=0.5, local_epochs=1, batch_size=64, model="convnet:width=8")
# A loaded 2-core machine: two actors, a small store; timeout: a stuck client or round fails the run after 5 min
# instead of hanging CI (it also bounds the wait for the SuperNodes).
RAY = dict(ray_cpus=2, client_cpus=1, object_store_mb=128, timeout=300.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-identical comparisons with the Ray actors need this process on the actors' thread count (1: Ray gives
    a 1-CPU actor OMP_NUM_THREADS=1, and here it inherits it from os.environ): the summation order of some
    CPU kernels depends on it. Restored afterwards."""
    import torch

    old, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(old)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


def test_missing_flower_is_a_clear_error(monkeypatch):
    import fedlatent.flower as fl

    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    with pytest.raises(FedLatentError, match=r"fedlatent\[flower\]"):
        fl.require_flwr()
    with pytest.raises(FedLatentError, match=r"fedlatent\[flower\]"):
        fl.run_simulation  # noqa: B018 - the lazy attribute checks first


needs_flower = pytest.mark.skipif(importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None,
                                  reason="the flower extra is not installed (pip install 'fedlatent[flower]')")


def _same_history(engine: list[dict], flower: list[dict]) -> None:
    """Every non-timing column of the engine's rows is reproduced exactly (NaN == NaN)."""
    assert len(engine) == len(flower)
    for a, b in zip(engine, flower):
        keys = {k for k in a if not k.endswith("_s")}
        assert keys <= set(b), sorted(keys - set(b))
        assert {k for k in b if not k.endswith("_s")} - keys <= {"failed"}
        for k in keys:
            x, y = a[k], b[k]
            if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
                continue
            assert x == y, (a["round"], k, x, y)


# -- records and run config (no simulation) ------------------------------------------------------------
@needs_flower
def test_upload_round_trip_is_bit_exact():
    import torch

    from fedlatent.fl.base import Upload
    from fedlatent.flower.messages import content_to_upload, upload_to_content

    g = torch.Generator().manual_seed(0)
    up = Upload(3, {"start": torch.randn(50, generator=g), "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
                    "bn.num_batches_tracked": torch.tensor(7)}, 41, {"train_loss": 0.25, "steps": 3.0})
    back = content_to_upload(upload_to_content(up))
    assert back.client_id == 3 and back.num_samples == 41 and back.metrics == {"train_loss": 0.25, "steps": 3.0}
    assert list(back.tensors) == list(up.tensors)
    for k, t in up.tensors.items():
        assert back.tensors[k].dtype == t.dtype and back.tensors[k].shape == t.shape
        assert torch.equal(back.tensors[k], t)
    content = upload_to_content(up)
    del content["metrics"]
    with pytest.raises(FedLatentError, match="metrics"):
        content_to_upload(content)


@needs_flower
def test_the_example_app_is_valid_and_its_run_config_parses():
    try:
        import tomllib
    except ImportError:  # Python 3.10: flwr depends on tomli
        import tomli as tomllib

    from flwr.common.config import flatten_dict, validate_fields_in_config

    from fedlatent.flower.spec import SERVER_KEYS, SPEC_KEYS, spec_from_run_config

    conf = tomllib.loads((REPO / "examples" / "flower" / "pyproject.toml").read_text())
    ok, errors, _ = validate_fields_in_config(conf)
    assert ok and not errors
    comp = conf["tool"]["flwr"]["app"]["components"]
    assert comp == {"serverapp": "fedlatent.flower.server_app:app", "clientapp": "fedlatent.flower.client_app:app"}
    run_config = flatten_dict(conf["tool"]["flwr"]["app"]["config"])
    spec, server = spec_from_run_config(run_config)
    assert spec.method == "feddgm" and spec.dataset == "digits" and spec.image_size is None
    assert spec.config["clients"] == 4 and spec.config["local_epochs"] == 5 and spec.config["min_size"] == 10
    assert spec.method_options["syn_steps"] == 8 and spec.method_options["space"] == "F2"
    assert "synth_round" not in spec.method_options  # the dynafed table is not used for feddgm
    assert spec.exclude_generator == "digits"  # FedDGM clients never hold the generator's public split
    assert server["out-dir"] is None and server["overwrite"] is False  # "" stands for None
    # every key spec.py documents is listed, so each one can be overridden with --run-config
    missing = (set(SERVER_KEYS) | set(SPEC_KEYS)) - set(run_config)
    assert not missing, sorted(missing)
    assert server == {"out-dir": None, "overwrite": False, "timeout": 3600.0, "wait-nodes": 300.0, "progress": False}
    _, server = spec_from_run_config({**run_config, "timeout": 60.0, "progress": True})
    assert server["timeout"] == 60.0 and server["progress"] is True
    dyn, _ = spec_from_run_config({**run_config, "method": "dynafed"})  # only the selected method's table is used
    assert dyn.method_options == {"synth_round": 3, "ipc": 2, "iterations": 50, "syn_steps": 5, "expert_epochs": 2,
                                  "finetune_epochs": 4} and dyn.exclude_generator is None
    with pytest.raises(FedLatentError, match="unknown run-config key"):
        spec_from_run_config({**run_config, "roundz": 3})
    with pytest.raises(FedLatentError, match="bad options for method"):
        spec_from_run_config({**run_config, "feddgm.no-such-option": 1})


def test_stateful_methods_are_refused():
    from fedlatent.flower.spec import check_supported, make_spec

    spec = make_spec("fedmd", config=dict(clients=3))
    with pytest.raises(FedLatentError, match="stateless clients"):
        check_supported(spec.build_strategy(), spec.fl_config())


# -- the strategy on an in-process grid (the ClientApp called directly, no Ray) ---------------------------------
class LocalGrid:
    """A Flower Grid stand-in: nodes are ClientApp calls in this process; an exception becomes an error reply."""

    def __init__(self, k: int, app=None, partitions: dict[int, int] | None = None, num_partitions: int | None = None):
        from fedlatent.flower.client_app import app as client_app

        self.app, self.k = app or client_app, k
        self.nodes = {1000 + 7 * i: (partitions or {}).get(i, i) for i in range(k)}
        self.num_partitions = num_partitions or k

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, Error, Message, RecordDict

        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=nid, node_config={"partition-id": self.nodes[nid],
                                                              "num-partitions": self.num_partitions},
                          state=RecordDict(), run_config={})
            try:
                out.append(self.app(m, ctx))
            except Exception as e:  # noqa: BLE001 - what Flower's runtime turns into an error reply
                out.append(Message(Error(0, f"{type(e).__name__}: {e}"), reply_to=m))
        return out


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps instruction messages with the running task's identity; set one for the in-process grid."""
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, k, v)


SMALL = dict(clients=3, rounds=2, seed=1, participation=1.0, local_epochs=1, batch_size=64, model="convnet:width=8")


@needs_flower
def test_strategy_on_a_local_grid_equals_the_engine(task_identity):
    from fedlatent.fl.simulation import simulate
    from fedlatent.flower.spec import load_data, make_spec
    from fedlatent.flower.strategy import FedLatentStrategy

    spec = make_spec("fedavg", config=SMALL)
    s = FedLatentStrategy(spec, load_data(spec))
    s.start(LocalGrid(3))
    res = s.result()
    eng = simulate("fedavg", progress=False, **SMALL)
    _same_history(eng.history, res.history)
    assert res.nodes == {0: 1000, 1: 1007, 2: 1014} and res.strategy.ctx.client_sizes == eng.strategy.ctx.client_sizes


@needs_flower
def test_a_users_evaluate_fn_is_merged_into_the_history(task_identity):
    """Flower's evaluate_fn does not replace the bookkeeping: every round is still recorded (result() works),
    the user's metrics join the rows (its accuracy replaces fedlatent's) and Flower's own result."""
    from flwr.app import MetricRecord

    from fedlatent.flower.spec import load_data, make_spec
    from fedlatent.flower.strategy import FedLatentStrategy

    seen = []

    def my_eval(rnd, arrays):
        seen.append((rnd, len(arrays)))
        return MetricRecord({"my_score": 10.0 + rnd, "accuracy": 0.5 + rnd / 10, "per_class": [1.0, 2.0]})

    spec = make_spec("fedavg", config=SMALL)
    s = FedLatentStrategy(spec, load_data(spec))
    s.start(LocalGrid(3), evaluate_fn=my_eval)
    res = s.result()
    n_arrays = len(s.initial_arrays())
    assert seen == [(0, n_arrays), (1, n_arrays), (2, n_arrays)] and n_arrays > 0
    assert [r["round"] for r in res.history] == [0, 1, 2]
    for r in res.history:
        assert r["my_score"] == 10.0 + r["round"] and r["accuracy"] == 0.5 + r["round"] / 10
        assert math.isfinite(r["loss"]) and "per_class" not in r  # fedlatent's loss is kept; lists go to Flower only
    assert res.final_accuracy == pytest.approx(0.7) and res.history[2]["accepted"] == 3
    flower_eval = s.flower_result.evaluate_metrics_serverapp[2]
    assert flower_eval["my_score"] == 12.0 and "loss" in flower_eval and list(flower_eval["per_class"]) == [1.0, 2.0]

    s = FedLatentStrategy(spec, load_data(spec))
    with pytest.raises(FedLatentError, match="history's own columns"):
        s.start(LocalGrid(3), evaluate_fn=lambda rnd, arrays: MetricRecord({"round": 1.0}))


@needs_flower
def test_failing_and_forged_clients_are_left_out(task_identity):
    from flwr.app import Message

    from fedlatent.flower.client_app import app as client_app
    from fedlatent.flower.messages import CONFIG
    from fedlatent.flower.spec import load_data, make_spec
    from fedlatent.flower.strategy import FedLatentStrategy

    def faulty(msg: Message, ctx):
        cfg = msg.content[CONFIG] if msg.metadata.message_type == "train" else {}
        if cfg.get("client-id") == 1 and cfg.get("server-round") == 2:
            raise RuntimeError("disk full")
        reply = client_app(msg, ctx)
        if cfg.get("client-id") == 2 and cfg.get("server-round") == 1:
            reply.content[CONFIG]["client-id"] = 0  # claims to be another client
        return reply

    spec = make_spec("fedavg", config=SMALL)
    s = FedLatentStrategy(spec, load_data(spec))
    s.start(LocalGrid(3, app=faulty))
    res = s.result()
    r1, r2 = res.history[1], res.history[2]
    assert (r1["accepted"], r1["rejected"], r1["failed"]) == (2, 1, 0)
    assert (r2["accepted"], r2["rejected"], r2["failed"]) == (2, 0, 1)
    assert res.rejections == [{"round": 1, "client": 2, "reason": "wrong client id 0 (expected 2)"}]
    assert s.failures[0]["client"] == 1 and "disk full" in s.failures[0]["error"]
    assert math.isfinite(r2["accuracy"])


@needs_flower
@pytest.mark.parametrize("grid_kw, match", [
    (dict(partitions={2: 0}), "used by two SuperNodes"),
    (dict(num_partitions=4), "num-partitions=4"),
])
def test_the_cohort_is_checked_before_round_one(task_identity, grid_kw, match):
    from fedlatent.flower.spec import load_data, make_spec
    from fedlatent.flower.strategy import FedLatentStrategy

    spec = make_spec("fedavg", config=SMALL)
    s = FedLatentStrategy(spec, load_data(spec), wait_nodes=0.5)
    with pytest.raises(FedLatentError, match=match):
        s.start(LocalGrid(3, **grid_kw))
    s = FedLatentStrategy(spec, load_data(spec), wait_nodes=0.5)
    with pytest.raises(FedLatentError, match="only 2 of 3 SuperNodes"):
        s.start(LocalGrid(2))


# -- real Flower simulations (Ray) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feddgm_runs(tmp_path_factory, one_thread):
    from fedlatent.fl.simulation import simulate
    from fedlatent.flower import run_simulation

    out = tmp_path_factory.mktemp("flower") / "feddgm"
    # a cluster address in the environment must not be joined: run_simulation starts its own local Ray
    # (without address="local", ray.init would try this address and refuse num_cpus)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "127.0.0.1:9"
    try:
        fl = run_simulation("feddgm", num_clients=4, rounds=2, seed=3, out=out, method_options=FEDDGM, **COMMON, **RAY)
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
    eng = simulate("feddgm", clients=4, rounds=2, seed=3, progress=False, method_options=dict(FEDDGM, progress=False),
                   **COMMON)
    return fl, eng, out


@needs_flower
def test_feddgm_over_flower_equals_the_in_process_engine(feddgm_runs):
    import torch

    from fedlatent.fl.simulation import client_schedule

    fl, eng, _ = feddgm_runs
    _same_history(eng.history, fl.history)
    sched = client_schedule(4, 2, 0.5, 3)
    assert [r["client_ids"] for r in fl.history[1:]] == [" ".join(map(str, s)) for s in sched]
    assert sorted(fl.nodes) == [0, 1, 2, 3] and len(set(fl.nodes.values())) == 4
    # the server-side distillation produced the same pooled set, bit for bit
    assert torch.equal(fl.strategy.pool.images, eng.strategy.pool.images)
    assert torch.equal(fl.strategy.pool.clients, eng.strategy.pool.clients)
    for r in fl.history[1:]:
        assert r["accepted"] == 2 and r["rejected"] == 0 and r["failed"] == 0
        for k in ("accuracy", "loss", "train_loss", "distill_loss", "server_train_loss"):
            assert math.isfinite(r[k]), (r["round"], k)
        assert r["uplink_bytes"] == 2 * 2 * 4 * fl.strategy.flat.numel  # start + end only, float32, 2 clients


@needs_flower
def test_feddgm_over_flower_exports_the_distilled_set(feddgm_runs):
    import json

    import torch

    from fedlatent.export import load_distilled
    from fedlatent.fl.run import read_metrics

    fl, _, out = feddgm_runs
    assert fl.distilled == out / "distilled.safetensors"
    ds, meta = load_distilled(fl.distilled)
    clients = [int(c) for c in fl.history[-1]["client_ids"].split()]
    assert tuple(ds.images.shape) == (2 * 10, 1, 16, 16) and bool(torch.isfinite(ds.images).all())
    assert torch.equal(ds.labels, torch.arange(10).repeat(2))
    assert sorted(set(ds.clients.tolist())) == clients and set(ds.rounds.tolist()) == {2}
    assert meta["generator"] == "digits" and meta["latent_space"] == "F2" and meta["ipc"] == 1 and meta["seed"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["final_accuracy"] == fl.final_accuracy
    rows = read_metrics(out / "metrics.csv")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["accuracy"] == fl.final_accuracy
    assert (out / "accuracy.png").is_file() and (out / "config.json").is_file()


@needs_flower
def test_dynafed_on_a_local_grid_equals_the_engine(task_identity):
    """DynaFed smoke through the Flower strategy and ClientApp (in process; the Ray path is the slow test below)."""
    from fedlatent.fl.simulation import simulate
    from fedlatent.flower.spec import load_data, make_spec
    from fedlatent.flower.strategy import FedLatentStrategy

    spec = make_spec("dynafed", method_options=dict(DYNAFED, progress=False),
                     config=dict(COMMON, clients=4, rounds=2, seed=1))
    s = FedLatentStrategy(spec, load_data(spec))
    s.start(LocalGrid(4))
    res = s.result()
    eng = simulate("dynafed", clients=4, rounds=2, seed=1, progress=False, method_options=dict(DYNAFED, progress=False),
                   **COMMON)
    _same_history(eng.history, res.history)
    assert res.strategy.pseudo is not None and tuple(res.strategy.pseudo.images.shape) == (10, 1, 16, 16)
    assert torch_equal(res.strategy.pseudo.images, eng.strategy.pseudo.images)
    assert math.isfinite(res.history[2]["synth_loss"]) and math.isfinite(res.history[2]["finetune_loss"])


@needs_flower
@pytest.mark.slow
def test_dynafed_over_flower_equals_the_engine():
    from fedlatent.fl.simulation import simulate
    from fedlatent.flower import run_simulation

    fl = run_simulation("dynafed", num_clients=4, rounds=2, seed=1, method_options=DYNAFED, **COMMON, **RAY)
    eng = simulate("dynafed", clients=4, rounds=2, seed=1, progress=False, method_options=dict(DYNAFED, progress=False),
                   **COMMON)
    _same_history(eng.history, fl.history)
    assert fl.strategy.pseudo is not None and torch_equal(fl.strategy.pseudo.images, eng.strategy.pseudo.images)
    assert math.isfinite(fl.history[2]["synth_loss"]) and math.isfinite(fl.history[2]["finetune_loss"])
    assert fl.total_s >= fl.wall_s > 0 and fl.connect_s > 0


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
