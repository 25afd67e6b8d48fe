"""The Ray backend: parallel client execution (``--backend ray``; optional extra ``fedlatent[ray]``).

:class:`RayBackend` supplies the ``client_map(fn, jobs)`` hook of :func:`fedlatent.fl.simulation.run_simulation`:
every job (one client's ``client_update`` / ``client_init``, or FedDGM's per-client server distillation) runs
as a Ray task with declared resources (``num_cpus`` / ``num_gpus`` per client), and the results come back in
job order. Per call (= per round) the function goes into the object store once (``ray.put``), and so does any
argument shared by several jobs (the :class:`~fedlatent.fl.base.FLContext`, a payload that is the same tensors
for every client), so nothing large is pickled once per task.

What is shipped: for a bound method the strategy's :meth:`worker_view` when it has one (a lean copy with only
what the client-side methods need: FedDGM drops its pool, global model and generator, and the worker loads the
generator by name, once per worker process - see :meth:`fedlatent.fl.methods.feddgm.FedDGM.worker_view`), otherwise the
whole strategy.

The device boundary: everything crosses it pickled by :func:`pack` / :func:`unpack`, which move every tensor
that lives on an accelerator to the CPU on the way out and onto the receiving side's device on the way in
(tensors on the CPU stay there). A task computes on the *worker's* device - ``cuda`` (the first GPU Ray gave
it; Ray numbers a task's GPUs from 0) when the run is on ``cuda`` or ``cuda:N``, else the CPU - and the
``device`` of every FLContext it receives (as an argument or as the strategy's ``ctx``) is rewritten to it; its
results come back onto the driver's device (``cuda:N``). A CUDA run needs GPUs per client
(``gpus_per_client > 0``): Ray hides the GPUs from tasks that declare none.

Determinism: a client's work is a pure function of its pickled arguments and is seeded per (round, client)
(:func:`fedlatent.fl.client.train_client`, FedDGM's distillers), so the order in which workers finish is
irrelevant. The one thing a worker process changes is PyTorch's intra-op thread count, which changes the
summation order of some CPU kernels; a task therefore runs with ``torch.set_num_threads(cpus_per_client)``
(at least 1), and a Ray run is bit-identical to a serial run made with the same thread count (e.g.
``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)`` for the default ``cpus_per_client=1``).

Failures: an exception in a task, or the death of its worker process, is retried ``retries`` times (Ray's
``max_retries``; exceptions through ``retry_exceptions=[RetryableTaskError]``) - except a
:class:`~fedlatent.utils.FedLatentError` (a rejected input or configuration, which would recur), which is not
retried. A client that still fails is returned as a :class:`~fedlatent.fl.base.ClientFailure`, which
the engine logs, records (``failed`` column of metrics.csv, ``failures`` in summary.json) and leaves out of the
round. A round in which no client returned raises :class:`~fedlatent.utils.FedLatentError`. ``timeout``
(seconds) bounds the wall time of one call's tasks, counted from their submission (time waiting for a free
CPU/GPU included): a task still unfinished then is cancelled (``ray.cancel(force=True)`` kills its worker) and
becomes a ClientFailure. When the driver leaves :meth:`RayBackend.client_map` by an exception (Ctrl-C, ...),
the call's unfinished tasks are cancelled the same way.

Lifecycle: Ray is started lazily on the first job. Without ``address`` a local Ray instance is started
(``num_cpus`` default: all cores; object store capped at :data:`DEFAULT_OBJECT_STORE_BYTES`) and shut down
by :meth:`RayBackend.close` (or the ``with`` block); with ``address`` (``"auto"``, ``"HOST:PORT"`` or
``"ray://HOST:10001"``) an existing cluster is joined and left running. A Ray runtime that is already
initialised in this process is used as it is and never shut down by us. On a cluster every node needs
fedlatent importable (and FedDGM's generator loadable under the same manifest name or path): install it in the
nodes' environment, or pass ``runtime_env`` (e.g. ``{"working_dir": ".", "pip": ["torch", ...]}``, see Ray's
runtime environments).
"""
from __future__ import annotations

import io
import logging
import math
import pickle
import socket
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from ..errors import FedLatentError

log = logging.getLogger("fedlatent.parallel")

DEFAULT_OBJECT_STORE_BYTES = 1 << 30  # local Ray: 1 GiB of shared memory instead of Ray's 30 % of RAM
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """``import ray`` with a one-line FedLatentError when it is missing."""
    try:
        import ray
    except ImportError as e:
        raise FedLatentError(f"--backend ray needs Ray: pip install 'fedlatent[ray]' ({e})") from None
    return ray


class RetryableTaskError(RuntimeError):
    """What a task raises for an exception worth retrying (anything but a FedLatentError); its message is the
    original ``"Type: message"`` (the original is chained as ``__cause__`` in the task's traceback)."""


# =============================================================================================
# The Ray boundary: tensors cross it on the CPU


_LOAD = threading.local()  # the device that `unpack` puts accelerator tensors on (per thread)


def _on_accelerator(t: Any) -> bool:
    """Whether a tensor lives on an accelerator, i.e. must travel on the CPU (a test may replace this to fake
    a device without having one)."""
    return t.device.type not in ("cpu", "meta")


def _rebuild(t: Any, parameter: bool, requires_grad: bool) -> Any:
    """Unpickling half of :func:`pack`: a tensor that left an accelerator goes to the loading side's device."""
    import torch

    dev = getattr(_LOAD, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    t = t.to(dev)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(True) if requires_grad else t


_PICKLER: type | None = None


def _pickler_class() -> type:
    global _PICKLER
    if _PICKLER is None:
        import torch
        from ray import cloudpickle  # Ray's copy: the one its pickle-by-value registrations apply to

        class BoundaryPickler(cloudpickle.Pickler):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self._copies: dict[int, Any] = {}  # the CPU copies made here (kept alive: ids stay unique)

            def reducer_override(self, obj):
                if isinstance(obj, torch.Tensor) and id(obj) not in self._copies and _on_accelerator(obj):
                    cpu = obj.detach().to("cpu")
                    self._copies[id(cpu)] = cpu
                    return _rebuild, (cpu, isinstance(obj, torch.nn.Parameter), bool(obj.requires_grad))
                return super().reducer_override(obj)

        _PICKLER = BoundaryPickler
    return _PICKLER


def pack(obj: Any) -> bytes:
    """Pickle ``obj`` (cloudpickle) for the other side of the Ray boundary, every accelerator tensor moved to the
    CPU (tensors already on the CPU stay as they are; two references to one tensor stay one tensor)."""
    buf = io.BytesIO()
    _pickler_class()(buf, protocol=5).dump(obj)
    return buf.getvalue()


def unpack(blob: bytes, device: Any = None) -> Any:
    """Inverse of :func:`pack` on the receiving side: tensors that left an accelerator go to ``device`` (None:
    ``cuda`` when this process sees a GPU, else the CPU); CPU tensors stay on the CPU."""
    old = getattr(_LOAD, "device", None)
    _LOAD.device = None if device is None else str(device)
    try:
        return pickle.loads(blob)  # only ever bytes that pack() made in this run (driver <-> its workers)
    finally:
        _LOAD.device = old


@dataclass
class _Method:
    """A bound method as shipped: the object (its :meth:`worker_view` when it has one) and the method name."""

    obj: Any
    name: str

    def __call__(self, *args: Any) -> Any:
        return getattr(self.obj, self.name)(*args)


def _shippable(fn: Callable) -> Callable:
    """What goes to the workers for ``fn``: a bound method becomes its object's lean ``worker_view()`` (when it
    has one) and the method's name; anything else goes as it is."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if owner is None or name is None or isinstance(owner, type) or getattr(owner, name, None) is None:
        return fn
    view = owner.worker_view() if callable(getattr(owner, "worker_view", None)) else owner
    return _Method(view, name)


def _ctx_device(obj: Any) -> str | None:
    from ..fl.base import FLContext

    return str(obj.device) if isinstance(obj, FLContext) else None


def driver_device(fn: Callable, args: Iterable[Any]) -> str | None:
    """The device a job's inputs live on in the driver: that of its FLContext argument, else of the strategy's
    ``ctx`` (None when neither exists)."""
    for a in args:
        dev = _ctx_device(a)
        if dev is not None:
            return dev
    return _ctx_device(getattr(getattr(fn, "__self__", None), "ctx", None))


def worker_device(device: str | None) -> str | None:
    """The device a task computes on for a run on ``device``: the device type (``cuda:3`` -> ``cuda``: a task
    sees its own GPUs, numbered from 0), the CPU for a CPU run, None (the worker decides) when unknown."""
    if device is None:
        return None
    import torch

    return torch.device(device).type


def localize(obj: Any, device: str | None) -> Any:
    """In a worker: the FLContext ``obj`` - or the ``ctx`` of the strategy a :class:`_Method` holds - with
    ``device`` as its device (no change for CPU runs)."""
    from ..fl.base import FLContext

    if device is None or device == "cpu":
        return obj
    if isinstance(obj, FLContext):
        return obj if str(obj.device) == device else replace(obj, device=device)
    if isinstance(obj, _Method) and isinstance(getattr(obj.obj, "ctx", None), FLContext):
        obj.obj.ctx = localize(obj.obj.ctx, device)
    return obj


def _run_job(fn_blob: bytes, threads: int, device: str | None, *arg_blobs: bytes) -> bytes:
    """The body of a Ray task: fix the thread count, unpack the function and arguments onto this worker's
    ``device``, run, pack the result. A FedLatentError is raised as it is (not retried); any other exception
    as :class:`RetryableTaskError`."""
    import torch

    torch.set_num_threads(threads)
    try:
        fn = localize(unpack(fn_blob, device), device)
        args = [localize(unpack(b, device), device) for b in arg_blobs]
        return pack(fn(*args))
    except FedLatentError:
        raise
    except Exception as e:  # noqa: BLE001 - retried by Ray (retry_exceptions=[RetryableTaskError])
        raise RetryableTaskError(_one_line(e)) from e


def _client_id(args: tuple) -> int | None:
    """The client a job belongs to: the ``client_id`` of its ClientData / Upload argument (None if none)."""
    from ..fl.base import ClientData, Upload

    for a in args:
        if isinstance(a, (ClientData, Upload)):
            return int(a.client_id)
    return None


def _share_key(obj: Any) -> tuple | None:
    """Identity of an argument for de-duplication: the object itself, or - for a name -> tensor dict that is
    rebuilt per client around the same tensors (a payload) - its tensors' memory and layout. (A payload is
    never modified during its round - the engine's contract, see fedlatent.fl.base - so the same memory means
    the same content for every job of the call.)"""
    import torch

    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return ("tensors",) + tuple((k, v.device.type, v.device.index, v.data_ptr(), v.storage_offset(),
                                     tuple(v.shape), tuple(v.stride()), v.dtype) for k, v in obj.items())
    if isinstance(obj, (int, float, str, bool, type(None))):
        return None  # small; inline
    return ("id", id(obj))


class RayBackend:
    """Runs clients as Ray tasks. Use as ``with RayBackend(...) as rb: simulate(..., backend=rb)``.

    ``address``: None (start a local Ray instance), ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"``.
    ``cpus_per_client`` / ``gpus_per_client``: the resources every task declares (fractions allowed, e.g.
    ``gpus_per_client=0.25`` puts four clients on one GPU); the task uses ``max(1, int(cpus_per_client))``
    PyTorch threads. ``retries``: extra attempts of a failed task (not for FedLatentError). ``timeout``:
    seconds the tasks of one :meth:`client_map` call may take from their submission (None: no limit); a task
    still running then is cancelled and reported as failed. ``num_cpus`` / ``num_gpus`` /
    ``object_store_memory``: resources of a local instance (ignored with ``address``). ``runtime_env``: Ray
    runtime environment of the tasks (for clusters whose nodes lack fedlatent).
    """

    def __init__(self, address: str | None = None, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                 retries: int = 1, timeout: float | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None, object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
                 runtime_env: Mapping[str, Any] | None = None, log_to_driver: bool = False):
        if not (isinstance(cpus_per_client, (int, float)) and cpus_per_client > 0):
            raise FedLatentError(f"ray: cpus per client must be > 0, got {cpus_per_client!r}")
        if not (isinstance(gpus_per_client, (int, float)) and gpus_per_client >= 0):
            raise FedLatentError(f"ray: gpus per client must be >= 0, got {gpus_per_client!r}")
        if gpus_per_client > 1 and gpus_per_client != int(gpus_per_client):
            raise FedLatentError(f"ray: gpus per client above 1 must be a whole number, got {gpus_per_client}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise FedLatentError(f"ray: retries must be an integer >= 0, got {retries!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise FedLatentError(f"ray: timeout must be a number of seconds > 0 (or None), got {timeout!r}")
        self.address = address or None
        self.cpus_per_client = float(cpus_per_client)
        self.gpus_per_client = float(gpus_per_client)
        self.retries = int(retries)
        self.timeout = None if timeout is None else float(timeout)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.object_store_memory = object_store_memory
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.log_to_driver = bool(log_to_driver)
        self._owned = False     # we started the Ray runtime (and shut it down in close)
        self._remote = None
        self._noted_threads = False

    # -- description / pickling -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The backend's settings (recorded in config.json)."""
        return {"name": "ray", "address": self.address, "cpus_per_client": self.cpus_per_client,
                "gpus_per_client": self.gpus_per_client, "retries": self.retries, "timeout": self.timeout}

    def __repr__(self) -> str:
        return f"RayBackend({', '.join(f'{k}={v!r}' for k, v in self.describe().items() if k != 'name')})"

    def __getstate__(self) -> dict:
        # Should a strategy that holds our client_map be pickled: the settings only, never the connection state.
        st = dict(self.__dict__)
        st["_owned"], st["_remote"] = False, None
        return st

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "RayBackend":
        """Connect to / start Ray (idempotent); raises FedLatentError when that is impossible."""
        ray = import_ray()
        if self._remote is not None and ray.is_initialized():
            return self
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": self.log_to_driver,
                                  "configure_logging": True, "logging_level": logging.WARNING}
            if self.runtime_env:
                kw["runtime_env"] = self.runtime_env
            if self.address is None:  # "local": always a new instance, never someone else's running one
                kw.update(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                          object_store_memory=self.object_store_memory)
            else:
                _probe(self.address)
                kw["address"] = self.address
            try:
                with warnings.catch_warnings():  # Ray's notice about a future default for GPU-less tasks
                    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
                    ray.init(**kw)
            except Exception as e:  # noqa: BLE001 - any failure to start/connect is a user-facing error
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray instance"
                raise FedLatentError(f"cannot start/connect to {where}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
            self._owned = True
        total = ray.cluster_resources()
        if self.cpus_per_client > total.get("CPU", 0.0):
            raise FedLatentError(f"ray: every client asks for {self.cpus_per_client:g} CPUs but the cluster has "
                                 f"{total.get('CPU', 0.0):g}")
        if self.gpus_per_client > total.get("GPU", 0.0):
            raise FedLatentError(f"ray: every client asks for {self.gpus_per_client:g} GPUs but the cluster has "
                                 f"{total.get('GPU', 0.0):g}")
        # Retry exceptions except FedLatentError (a rejected input or setting recurs): _run_job raises every
        # other exception as RetryableTaskError, and only that type is on Ray's allowlist. (FedLatentError is
        # a RuntimeError, so an allowlist of the built-in types could not leave it out.) A crashed worker is a
        # system failure, retried by max_retries alone.
        self._remote = ray.remote(_run_job).options(
            num_cpus=self.cpus_per_client, num_gpus=self.gpus_per_client, max_retries=self.retries,
            retry_exceptions=[RetryableTaskError])
        return self

    def close(self) -> None:
        """Shut Ray down if this backend started it (a runtime found already running is left alone)."""
        if self._owned:
            ray = import_ray()
            if ray.is_initialized():
                ray.shutdown()
        self._owned, self._remote = False, None

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine hooks -----------------------------------------------------------------------------
    def client_map(self, fn: Callable, jobs: Iterable[tuple]) -> list:
        """``[fn(*args) for args in jobs]`` as parallel Ray tasks, in job order.

        A job that still fails after ``retries`` retries (a FedLatentError: at once), or that has not finished
        ``timeout`` seconds after submission, yields a :class:`~fedlatent.fl.base.ClientFailure`.
        Tensors cross to the workers and back on the CPU; results land on the driver's device (see the
        module notes).
        """
        from ..fl.base import ClientFailure

        jobs = [tuple(a) for a in jobs]
        if not jobs:
            return []
        here = driver_device(fn, jobs[0])
        there = worker_device(here)
        if there not in (None, "cpu") and self.gpus_per_client <= 0:
            raise FedLatentError(f"a {there.upper()} run on Ray needs GPUs per client (--ray-gpus-per-client > 0, "
                                 "e.g. 0.25 runs four clients per GPU)")
        self.start()
        ray = import_ray()
        counts: dict[tuple, int] = {}
        for args in jobs:
            for a in args:
                k = _share_key(a)
                if k is not None:
                    counts[k] = counts.get(k, 0) + 1
        refs: dict[tuple, Any] = {}

        def share(a: Any) -> Any:
            k = _share_key(a)
            if k is None or counts[k] < 2:
                return pack(a)  # Ray puts a large single-use argument into the store itself
            if k not in refs:
                refs[k] = ray.put(pack(a))
            return refs[k]

        fn_ref = ray.put(pack(_shippable(fn)))
        threads = max(1, int(self.cpus_per_client))
        if not self._noted_threads:
            import torch

            self._noted_threads = True
            if torch.get_num_threads() != threads:
                log.info("Ray tasks use %d PyTorch thread(s), this process %d: results can differ from a serial run "
                         "in the last bits (same thread count => identical)", threads, torch.get_num_threads())
        pending: list = []
        out: list = []
        try:
            for args in jobs:
                pending.append(self._remote.remote(fn_ref, threads, there, *map(share, args)))
            refs.clear()  # the pending tasks keep what they need alive
            late: set = set()
            if self.timeout is not None:
                _, not_ready = ray.wait(pending, num_returns=len(pending), timeout=self.timeout)
                late = {r.hex() for r in not_ready}
                for r in not_ready:
                    ray.cancel(r, force=True)  # kills its worker (a stuck task may never return otherwise)
            for args, ref in zip(jobs, pending):
                cid = _client_id(args)
                if ref.hex() in late:
                    log.debug("client %s: no result %g s after submission; cancelled", cid, self.timeout)
                    out.append(ClientFailure(cid, f"TimeoutError: no result {self.timeout:g} s after submission "
                                                  "(--ray-timeout); task cancelled", 1))
                    continue
                try:
                    out.append(unpack(ray.get(ref), here))
                except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...: reported, not fatal
                    final = isinstance(getattr(e, "cause", None), FedLatentError)
                    attempts = 1 if final else self.retries + 1
                    msg = _short_error(e)
                    log.debug("client %s failed after %d attempt(s): %s", cid, attempts, msg)  # the caller logs
                    out.append(ClientFailure(cid, msg, attempts))
        finally:
            if len(out) < len(pending):  # left by an exception (KeyboardInterrupt, ...): stop what still runs
                _cancel(ray, pending[len(out):])
        return out

    def attach(self, strategy: Any) -> Any:
        """Let a strategy with independent per-client server work use this backend for it (FedDGM's looped
        per-client distillation) through :meth:`~fedlatent.fl.base.Strategy.attach_runner`; returns the strategy."""
        if callable(getattr(strategy, "attach_runner", None)):
            strategy.attach_runner(self.client_map)
        return strategy


def _cancel(ray: Any, refs: list) -> None:
    """Cancel tasks (force: kill their workers), ignoring those already finished and a Ray that is gone."""
    for r in refs:
        try:
            ray.cancel(r, force=True)
        except Exception as e:  # noqa: BLE001 - best effort while an exception is on its way up
            log.debug("could not cancel a task: %s", e)


def _one_line(e: BaseException) -> str:
    text = [t for t in str(e).strip().splitlines() if t.strip()]
    return f"{type(e).__name__}: {text[0].strip() if text else ''}"[:500]


def _short_error(e: BaseException) -> str:
    """One line: the innermost exception type and message of a Ray error."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    if isinstance(e, RetryableTaskError):
        return str(e).strip().splitlines()[0][:500] if str(e).strip() else "RetryableTaskError"
    text = str(e).strip().splitlines()
    line = next((t for t in reversed(text) if t.strip()), "") if type(e).__module__.startswith("ray") else \
        (text[0] if text else "")
    return f"{type(e).__name__}: {line.strip()}"[:500]


def _probe(address: str) -> None:
    """Fail fast (FedLatentError) when ``HOST:PORT`` / ``ray://HOST:PORT`` accepts no TCP connection."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise FedLatentError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise FedLatentError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


__all__ = ["DEFAULT_OBJECT_STORE_BYTES", "RayBackend", "RetryableTaskError", "import_ray", "pack", "unpack",
           "localize", "driver_device", "worker_device"]
