"""Ray backend (fedlatent.parallel): same seed => bit-identical to serial (FedAvg, FedDGM with its per-client
distillation on Ray), retried / reported client failures (exception and worker crash), clear errors, CLI.

One local Ray instance (2 CPUs) serves the whole module; tests that need no Ray run without it. Everything
compares against a serial run made with the same PyTorch thread count (1), see fedlatent.parallel.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from fedlatent.fl import FedAvg, FLConfig, run_simulation
from fedlatent.fl.simulation import ClientFailure, sequential_map
from fedlatent.utils import FedLatentError

FEDDGM_TINY = dict(clients=4, participation=1.0, rounds=2, local_epochs=1, batch_size=64, model="convnet:width=8",
                   surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2, train_epochs=1, seed=3,
                   batched=False, progress=False, baseline="none")  # these tests are about the backends


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # distill_federated(out=None) writes runs/feddgm-<dataset>-<time>: not into the repo


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count of the Ray tasks (cpus_per_client=1): bit-identical results
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ray_rt(one_thread):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedlatent[ray]')")
    from ray import cloudpickle

    started = not ray.is_initialized()
    if started:
        with warnings.catch_warnings():  # Ray's notice about a future default for GPU-less tasks
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 << 20, configure_logging=False)
    # The failing strategies below are defined here; ship them by value (workers cannot import this file).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny():
    from fedlatent.data import load_digits

    d = load_digits(resize=8)
    return dataclasses.replace(d, x_train=d.x_train[:320], y_train=d.y_train[:320], x_test=d.x_test[:100],
                               y_test=d.y_test[:100])


def _cfg(**kw) -> FLConfig:
    base = dict(clients=4, rounds=2, participation=1.0, model="convnet:width=8", batch_size=32, alpha=1.0, min_size=5,
                seed=3)
    base.update(kw)
    return FLConfig(**base)


def _rows(result, drop=("round_s", "wall_s", "distill_s", "server_train_s")):
    return [{k: v for k, v in r.items() if k not in drop} for r in result.history]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Faulty(FedAvg):
    """FedAvg whose clients in ``bad`` fail: "raise" always, "flaky" on their first attempt only, "reject"
    always with a FedLatentError, "crash" kills the worker process (``mode``: one for all, or a dict client ->
    mode). Every attempt leaves a file in ``marks`` (attempts are counted across processes)."""

    def __init__(self, bad=(), mode="raise", marks=None):
        self.modes = dict(mode) if isinstance(mode, dict) else {c: mode for c in bad}
        self.marks = marks

    def client_update(self, ctx, rnd, client_id, payload, data):
        mode = self.modes.get(client_id)
        if mode is not None:
            marks = Path(self.marks)
            first = not any(marks.glob(f"r{rnd}-c{client_id}-*"))
            (marks / f"r{rnd}-c{client_id}-{uuid.uuid4().hex}").touch()
            if mode == "crash":
                os._exit(3)
            if mode == "reject":
                raise FedLatentError(f"client {client_id}: bad setting")
            if mode == "raise" or first:
                raise RuntimeError(f"client {client_id} broke in round {rnd}")
        return super().client_update(ctx, rnd, client_id, payload, data)


def _nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


class _Interrupt(BaseException):
    """Stands for a KeyboardInterrupt reaching the driver while tasks run."""


def _dropping_map(bad):
    """A serial runner that reports the clients in ``bad`` as failed (what Ray reports after the retries)."""
    def run(fn, jobs):
        return [ClientFailure(args[2], "dropped") if args[2] in bad else fn(*args) for args in jobs]

    return run


# -- the engine's failure handling (no Ray needed) -------------------------------------------------------------
def test_engine_leaves_failed_clients_out_and_records_them(tiny, one_thread):
    res = run_simulation(FedAvg(), tiny, _cfg(), None, progress=False, client_map=_dropping_map({1}))
    full = run_simulation(FedAvg(), tiny, _cfg(), None, progress=False)
    assert [r["failed"] for r in res.history] == [0, 1, 1] and [r["accepted"] for r in res.history[1:]] == [3, 3]
    assert [(f["round"], f["client"], f["error"]) for f in res.failures] == [(1, 1, "dropped"), (2, 1, "dropped")]
    assert res.summary()["failed"] == 2 and res.rejected == 0
    # the average of 3 clients is not the average of 4: the failed client really is left out
    assert not _same_state(res.strategy.model, full.strategy.model)
    # the uplink counts the 3 uploads that arrived, the downlink the 4 payloads sent
    assert 4 * res.history[1]["uplink_bytes"] == 3 * res.history[1]["downlink_bytes"]


def test_engine_raises_when_no_client_returned_or_client_init_failed(tiny):
    with pytest.raises(FedLatentError, match="round 1: no client returned"):
        run_simulation(FedAvg(), tiny, _cfg(), None, progress=False, client_map=_dropping_map({0, 1, 2, 3}))

    class _Init(FedAvg):
        def client_init(self, ctx, client_id, data):
            return None

    def init_fails(fn, jobs):
        jobs = list(jobs)
        return [ClientFailure(2, "boom") if fn.__name__ == "client_init" and a[1] == 2 else fn(*a) for a in jobs]

    with pytest.raises(FedLatentError, match="client_init of client 2 failed"):
        run_simulation(_Init(), tiny, _cfg(), None, progress=False, client_map=init_fails)


def test_feddgm_distill_map_hook_gives_the_loop_s_numbers(one_thread):
    """FedDGM's per-client distillation jobs (distill_client through distill_map) == the in-process loop."""
    from fedlatent.fl.feddgm import distill_federated

    calls = []

    class _Counting:
        def client_map(self, fn, jobs):
            jobs = list(jobs)
            calls.append((fn.__name__, len(jobs)))
            return sequential_map(fn, jobs)

        def attach(self, strategy):
            strategy.distill_map = self.client_map

        def describe(self):
            return {"name": "counting"}

    a = distill_federated(out=None, **FEDDGM_TINY)
    b = distill_federated(out=None, backend=_Counting(), **FEDDGM_TINY)
    assert calls == [("client_update", 4), ("distill_client", 4)] * 2
    assert _rows(a.simulation) == _rows(b.simulation)
    sa, sb = a.simulation.strategy, b.simulation.strategy
    assert torch.equal(sa.pool.images, sb.pool.images) and torch.equal(sa.pool.f_k, sb.pool.f_k)
    assert _same_state(sa.model, sb.model)


def test_feddgm_worker_view_is_lean_and_loads_the_generator_by_name(one_thread):
    """What Ray ships for FedDGM: no pool / round log / global model / generator object (the worker loads the
    generator by name, once per process), and its distill_client gives the full strategy's numbers."""
    pytest.importorskip("ray")
    from ray import cloudpickle

    import fedlatent.fl.feddgm as fd
    from fedlatent.parallel import _Method, _shippable, pack, unpack

    s = fd.distill_federated(out=None, **{**FEDDGM_TINY, "rounds": 0, "model": "convnet:width=4"}).simulation.strategy
    s.pool = fd.Pool(torch.randn(40, 1, 16, 16), torch.arange(40) % 10, torch.zeros(40, dtype=torch.long),
                     torch.ones(40, dtype=torch.long))
    s.round_log = [{"round": 1}]
    shipped = _shippable(s.distill_client)
    assert isinstance(shipped, _Method) and shipped.name == "distill_client"
    v = shipped.obj
    assert v is not s and v.G is None and v._g_by_name == "digits" and v.pool is None and v.round_log == []
    assert v.model is None and v.surrogate is s.surrogate and s.G is not None and s.pool is not None  # s untouched
    whole, lean = len(cloudpickle.dumps(s.distill_client)), len(pack(shipped))
    assert lean * 10 < whole, (lean, whole)
    up = fd.Upload(0, {"start": s.flat.flatten(), "end": s.flat.flatten() + 0.01}, 10)
    fd._WORKER_GENERATORS.clear()
    got = unpack(pack(shipped))(2, up)  # as in a fresh worker: the generator is loaded there by name
    assert list(fd._WORKER_GENERATORS) == [("digits", "cpu")]
    ref = s.distill_client(2, up)
    assert torch.equal(got.images, ref.images) and torch.equal(got.f_k, ref.f_k) and got.run.losses == ref.run.losses
    # a generator object that did not come from its name goes as it is
    s.G = other = copy.deepcopy(s.G)
    assert _shippable(s.distill_client).obj.G is other
    fd._WORKER_GENERATORS.clear()
    with pytest.raises(FedLatentError, match="is not the run's"):  # another checkpoint under that name here
        fd.worker_generator("digits", "cpu", sha256="0" * 64)


def test_feddgm_failed_distillation_job_drops_that_client_s_set(one_thread, caplog):
    from fedlatent.fl.feddgm import distill_federated

    class _LosesClient1:
        def client_map(self, fn, jobs):
            if fn.__name__ != "distill_client":
                return sequential_map(fn, jobs)
            return [ClientFailure(1, "RuntimeError: lost") if up.client_id == 1 else fn(rnd, up) for rnd, up in jobs]

        def attach(self, strategy):
            strategy.distill_map = self.client_map

        def describe(self):
            return {"name": "loses client 1"}

    with caplog.at_level(logging.WARNING, logger="fedlatent"):
        res = distill_federated(out=None, backend=_LosesClient1(), **{**FEDDGM_TINY, "rounds": 1})
    row = res.simulation.history[1]
    assert row["distill_dropped"] == 1 and row["distill_failed"] == 1 and row["pool_size"] == 30
    pool = res.simulation.strategy.pool
    assert sorted(set(pool.clients.tolist())) == [0, 2, 3]
    entry = res.simulation.strategy.round_log[0]
    assert "job failed: RuntimeError: lost" in entry["failures"][1]
    assert entry["lr"][1] is None and all(isinstance(x, float) for i, x in enumerate(entry["lr"]) if i != 1)
    assert [r.getMessage() for r in caplog.records if "client 1" in r.getMessage()] == \
        ["round 1: the distillation of client 1 failed (job failed: RuntimeError: lost); its set is dropped"]


def test_feddgm_every_distillation_job_failing_is_an_error(one_thread):
    from fedlatent.fl.feddgm import distill_federated

    class _LosesAll:
        def client_map(self, fn, jobs):
            if fn.__name__ != "distill_client":
                return sequential_map(fn, jobs)
            return [ClientFailure(up.client_id, f"RuntimeError: lost {up.client_id}") for _, up in jobs]

        def attach(self, strategy):
            strategy.distill_map = self.client_map

        def describe(self):
            return {"name": "loses all"}

    with pytest.raises(FedLatentError, match=r"round 1: every distillation job failed \(4 of 4\); first error "
                                             r"\(client 0\): RuntimeError: lost 0"):
        distill_federated(out=None, backend=_LosesAll(), **{**FEDDGM_TINY, "rounds": 1, "train_epochs": 0})


def test_backend_choice_errors():
    from fedlatent.parallel import RayBackend, make_backend

    assert make_backend("serial") is None and make_backend(None) is None
    with pytest.raises(FedLatentError, match="unknown backend 'dask'"):
        make_backend("dask")
    with pytest.raises(FedLatentError, match="need --backend ray"):
        make_backend("serial", "127.0.0.1:6379")
    with pytest.raises(FedLatentError, match="need --backend ray"):
        make_backend("serial", cpus_per_client=2)
    with pytest.raises(FedLatentError, match="cpus per client"):
        RayBackend(cpus_per_client=0)
    with pytest.raises(FedLatentError, match="retries"):
        RayBackend(retries=-1)


def test_missing_ray_is_one_clear_error(monkeypatch):
    from fedlatent.parallel import make_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(FedLatentError, match=r"pip install 'fedlatent\[ray\]'"):
        make_backend("ray")


class _Probe:
    """A strategy-like object whose method reports the devices it saw in the worker."""

    def __init__(self, ctx):
        self.ctx = ctx

    def work(self, ctx, x64, x32):
        return {"seen": (ctx.device, self.ctx.device, x64.device.type, x32.device.type),
                "out": torch.arange(3, dtype=torch.float64), "cpu": torch.ones(2)}


def test_device_boundary_moves_accelerator_tensors_through_the_cpu(monkeypatch):
    """Without a GPU: float64 tensors play "on the accelerator" and the meta device plays the receiving GPU.
    Accelerator tensors leave as CPU data and arrive on the receiver's device; CPU tensors stay; the worker
    computes on its own device (FLContext args and the strategy's ctx rewritten), results land on the driver's."""
    pytest.importorskip("ray")
    import fedlatent.parallel as par
    from fedlatent.fl.base import FLContext

    monkeypatch.setattr(par, "_on_accelerator", lambda t: t.dtype == torch.float64)
    a = torch.randn(4, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    obj = {"a": a, "again": a, "b": torch.randn(3), "p": p}
    back = par.unpack(par.pack(obj), "meta")
    assert back["a"].device.type == "meta" and back["again"] is back["a"] and back["a"].dtype == torch.float64
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad and back["p"].device.type == "meta"
    assert back["b"].device.type == "cpu" and torch.equal(back["b"], obj["b"])
    cpu = par.unpack(par.pack(obj), "cpu")
    assert torch.equal(cpu["a"], a) and torch.equal(cpu["p"], p)  # the values really travel

    ctx = FLContext(_cfg(), 10, 1, 8, [str(i) for i in range(10)], [1] * 4, device="cuda:3")
    cpu_ctx = dataclasses.replace(ctx, device="cpu")
    assert par.driver_device(_Probe(cpu_ctx).work, (ctx,)) == "cuda:3"  # the argument's context first
    assert par.driver_device(_Probe(ctx).work, ()) == "cuda:3" and par.driver_device(_nap, ()) is None
    assert par.worker_device("cuda:3") == "cuda" and par.worker_device("cpu") == "cpu"
    assert par.worker_device(None) is None
    fn = par._shippable(_Probe(ctx).work)
    x64, x32 = torch.randn(2, dtype=torch.float64), torch.randn(2)
    blob = par._run_job(par.pack(fn), 1, "meta", par.pack(ctx), par.pack(x64), par.pack(x32))  # in-process "worker"
    res = par.unpack(blob, "meta")  # the driver's device
    assert res["seen"] == ("meta", "meta", "meta", "cpu")
    assert res["out"].device.type == "meta" and res["cpu"].device.type == "cpu"
    assert torch.equal(par.unpack(blob, "cpu")["out"], torch.arange(3, dtype=torch.float64))
    assert ctx.device == "cuda:3"  # the driver's context is not modified
    with pytest.raises(FedLatentError, match="CUDA run on Ray needs GPUs per client"):
        par.RayBackend().client_map(_Probe(ctx).work, [(ctx, x64, x32)])
    with pytest.raises(FedLatentError, match="timeout"):
        par.RayBackend(timeout=0)


# -- on Ray ------------------------------------------------------------------------------------------------------
def test_unreachable_or_malformed_ray_address(ray_rt):
    from fedlatent.parallel import make_backend

    with pytest.raises(FedLatentError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        make_backend("ray", "127.0.0.1:1")
    with pytest.raises(FedLatentError, match="is not HOST:PORT"):
        make_backend("ray", "no-port-here")


def test_fedavg_on_ray_is_bit_identical_to_serial(ray_rt, tiny):
    from fedlatent.parallel import RayBackend

    serial = run_simulation(FedAvg(), tiny, _cfg(), None, progress=False)
    with RayBackend(retries=0) as rb:
        par = run_simulation(FedAvg(), tiny, _cfg(), None, progress=False, client_map=rb.client_map)
    assert ray_rt.is_initialized()  # a runtime we found running is never shut down by the backend
    assert _rows(par) == _rows(serial) and par.failures == []
    assert _same_state(par.strategy.model, serial.strategy.model)


def test_feddgm_clients_and_distillation_on_ray_are_bit_identical_to_serial(ray_rt):
    from fedlatent.fl.feddgm import distill_federated
    from fedlatent.parallel import RayBackend

    class _Recording(RayBackend):
        def client_map(self, fn, jobs):
            self.calls = getattr(self, "calls", []) + [fn.__name__]
            return super().client_map(fn, jobs)

    serial = distill_federated(out=None, **FEDDGM_TINY)
    rb = _Recording()
    par = distill_federated(out=None, backend=rb, **FEDDGM_TINY)
    assert rb.calls == ["client_update", "distill_client"] * 2  # the per-client distillation ran on Ray
    assert _rows(par.simulation) == _rows(serial.simulation)
    sa, sb = serial.simulation.strategy, par.simulation.strategy
    assert torch.equal(sa.pool.images, sb.pool.images) and torch.equal(sa.pool.f_k, sb.pool.f_k)
    assert _same_state(sa.model, sb.model)
    assert par.simulation.history[-1]["distill_failed"] == 0 and par.simulation.history[-1]["pool_size"] == 40


def test_failing_client_is_retried_then_reported_and_the_round_goes_on(ray_rt, tiny, tmp_path):
    from fedlatent.parallel import RayBackend

    with RayBackend(retries=1) as rb:
        par = run_simulation(_Faulty(mode={1: "raise", 2: "reject"}, marks=str(tmp_path)), tiny, _cfg(), None,
                             progress=False, client_map=rb.client_map)
    assert len(list(tmp_path.glob("r1-c1-*"))) == 2 and len(list(tmp_path.glob("r2-c1-*"))) == 2  # 1 + 1 retry
    assert len(list(tmp_path.glob("r1-c2-*"))) == 1 and len(list(tmp_path.glob("r2-c2-*"))) == 1  # never retried
    assert [(f["round"], f["client"], f["attempts"]) for f in par.failures] == [(1, 1, 2), (1, 2, 1), (2, 1, 2),
                                                                                (2, 2, 1)]
    assert par.failures[0]["error"] == "RuntimeError: client 1 broke in round 1"
    assert par.failures[1]["error"] == "FedLatentError: client 2: bad setting"
    # exactly the serial run without clients 1 and 2
    ref = run_simulation(FedAvg(), tiny, _cfg(), None, progress=False, client_map=_dropping_map({1, 2}))
    assert [{k: v for k, v in r.items() if k != "error"} for r in _rows(par)] == _rows(ref)
    assert _same_state(par.strategy.model, ref.strategy.model)


def test_flaky_client_succeeds_on_retry_with_serial_numbers(ray_rt, tiny, tmp_path):
    from fedlatent.parallel import RayBackend

    with RayBackend(retries=1) as rb:
        par = run_simulation(_Faulty({0, 2}, "flaky", str(tmp_path)), tiny, _cfg(rounds=1), None, progress=False,
                             client_map=rb.client_map)
    assert len(list(tmp_path.glob("r1-c0-*"))) == 2 and par.failures == []
    serial = run_simulation(FedAvg(), tiny, _cfg(rounds=1), None, progress=False)
    assert _rows(par) == _rows(serial) and _same_state(par.strategy.model, serial.strategy.model)


def test_cli_simulate_backend_ray(ray_rt, tmp_path):
    from click.testing import CliRunner

    from fedlatent.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--clients", "4", "--rounds", "1", "--participation", "1", "--model", "convnet:width=8",
            "--image-size", "8", "--out", str(out), "-q", "--backend", "ray", "--ray-retries", "0",
            "--ray-timeout", "300"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "fedavg: final accuracy" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend"] == {"name": "ray", "address": None, "cpus_per_client": 1.0, "gpus_per_client": 0.0,
                              "retries": 0, "timeout": 300.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0
    bad = CliRunner().invoke(main, ["simulate", "--rounds", "1", "--ray-retries", "2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "need --backend ray" in bad.output


def test_shared_arguments_go_to_the_object_store_once_per_round(ray_rt, tiny, monkeypatch):
    """The strategy (bound client_update), the context and FedAvg's payload - rebuilt per client around the
    same tensors - are put once per round; the clients' own data are not put by us."""
    from fedlatent.parallel import RayBackend, _share_key

    m = torch.nn.Linear(2, 2)
    p1, p2 = ({k: v.detach() for k, v in m.state_dict().items()} for _ in range(2))
    assert p1 is not p2 and _share_key(p1) == _share_key(p2)
    assert _share_key({k: v.clone() for k, v in p1.items()}) != _share_key(p1)  # equal values, other memory
    assert _share_key({**p1, "bias": p1["bias"][:1]}) != _share_key(p1)  # a view of part of a tensor

    import pickle

    put = ray_rt.put
    puts = []
    monkeypatch.setattr(ray_rt, "put", lambda obj, **kw: puts.append(obj) or put(obj, **kw))
    with RayBackend(retries=0) as rb:
        run_simulation(FedAvg(), tiny, _cfg(rounds=2), None, progress=False, client_map=rb.client_map)
    assert all(isinstance(b, bytes) for b in puts)  # packed (tensors on the CPU), see fedlatent.parallel.pack
    kinds = [type(pickle.loads(b)).__name__ for b in puts]
    assert sorted(kinds) == sorted(["_Method", "FLContext", "dict"] * 2)


# -- these kill workers: last ---------------------------------------------------------------------------------------
def test_timed_out_task_is_cancelled_and_reported(ray_rt):
    import time

    from fedlatent.parallel import RayBackend

    rb = RayBackend(retries=1, timeout=2)
    t = time.perf_counter()
    out = rb.client_map(_nap, [(0.0,), (60.0,)])
    assert time.perf_counter() - t < 30
    assert out[0] == 0.0 and isinstance(out[1], ClientFailure)
    assert out[1].error.startswith("TimeoutError: no result 2 s after submission") and out[1].attempts == 1


def _marked_nap(seconds, marks):
    """Sleeps; leaves ``<pid>`` in ``marks`` when it starts and ``<pid>.done`` if it ever finishes."""
    import time

    (Path(marks) / str(os.getpid())).touch()
    time.sleep(seconds)
    (Path(marks) / f"{os.getpid()}.done").touch()
    return seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker may linger as a zombie until Ray reaps it
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def test_tasks_are_cancelled_when_an_exception_leaves_client_map(ray_rt, monkeypatch, tmp_path):
    """What matters: no client task runs on after the driver left client_map. Every task was force-cancelled,
    and every worker that had started one is gone within 30 s. (Whether Ray then also marks each result
    TaskCancelledError is its business, and racy for a task cancelled between push and start: Ray issues
    #24359 / #46315.)"""
    import time

    from fedlatent.parallel import RayBackend

    cancelled = []
    real_cancel = ray_rt.cancel
    monkeypatch.setattr(ray_rt, "cancel", lambda ref, **kw: cancelled.append((ref, kw)) or real_cancel(ref, **kw))

    def interrupted(*a, **kw):
        time.sleep(2)  # let the tasks start (or not): both must end up stopped
        raise _Interrupt()

    monkeypatch.setattr(ray_rt, "get", interrupted)
    with pytest.raises(_Interrupt):
        RayBackend(retries=1).client_map(_marked_nap, [(60.0, str(tmp_path)), (60.0, str(tmp_path))])
    monkeypatch.undo()
    assert len(cancelled) == 2 and all(kw == {"force": True} for _, kw in cancelled)

    def running():
        return [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit() and _alive(int(p.name))]

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == []
    time.sleep(3)  # nothing cancelled while queued starts late
    assert running() == [] and not list(tmp_path.glob("*.done"))


def test_crashed_worker_is_reported_and_the_round_goes_on(ray_rt, tiny, tmp_path):
    from fedlatent.parallel import RayBackend

    with RayBackend(retries=1) as rb:
        par = run_simulation(_Faulty({3}, "crash", str(tmp_path)), tiny, _cfg(rounds=1), None, progress=False,
                             client_map=rb.client_map)
    assert len(list(tmp_path.glob("r1-c3-*"))) == 2  # the crash was retried once
    assert [(f["client"], f["attempts"]) for f in par.failures] == [(3, 2)]
    assert par.failures[0]["error"].startswith("WorkerCrashedError")
    assert par.history[1]["accepted"] == 3 and par.history[1]["failed"] == 1
    ref = run_simulation(FedAvg(), tiny, _cfg(rounds=1), None, progress=False, client_map=_dropping_map({3}))
    assert _same_state(par.strategy.model, ref.strategy.model)
