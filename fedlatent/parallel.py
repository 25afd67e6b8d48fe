"""Parallel client execution with Ray (``--backend ray``; optional extra ``fedlatent[ray]``).

:class:`RayBackend` supplies the ``client_map(fn, jobs)`` hook of :func:`fedlatent.fl.simulation.run_simulation`:
every job (one client's ``client_update`` / ``client_init``, or FedDGM's per-client server distillation) runs
as a Ray task with declared resources (``num_cpus`` / ``num_gpus`` per client), and the results come back in
job order. Per call (= per round) the function - for a bound method that is the strategy with all the state
the clients share - goes into the object store once (``ray.put``), and so does any argument shared by several
jobs (the :class:`~fedlatent.fl.base.FLContext`, a payload that is the same tensors for every client), so
nothing large is pickled once per task.

Determinism: a client's work is a pure function of its pickled arguments and is seeded per (round, client)
(:func:`fedlatent.fl.client.train_client`, FedDGM's distillers), so the order in which workers finish is
irrelevant. The one thing a worker process changes is PyTorch's intra-op thread count, which changes the
summation order of some CPU kernels; a task therefore runs with ``torch.set_num_threads(cpus_per_client)``
(at least 1), and a Ray run is bit-identical to a serial run made with the same thread count (e.g.
``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)`` for the default ``cpus_per_client=1``).

Failures: an exception in a task, or the death of its worker process, is retried ``retries`` times (Ray's
``max_retries`` with ``retry_exceptions=True``); a client that still fails is returned as a
:class:`~fedlatent.fl.simulation.ClientFailure`, which the engine logs, records (``failed`` column of
metrics.csv, ``failures`` in summary.json) and leaves out of the round. A round in which no client returned
raises :class:`~fedlatent.utils.FedLatentError`.

Lifecycle: Ray is started lazily on the first job. Without ``address`` a local Ray instance is started
(``num_cpus`` default: all cores; object store capped at :data:`DEFAULT_OBJECT_STORE_BYTES`) and shut down
by :meth:`RayBackend.close` (or the ``with`` block); with ``address`` (``"auto"``, ``"HOST:PORT"`` or
``"ray://HOST:10001"``) an existing cluster is joined and left running. A Ray runtime that is already
initialised in this process is used as it is and never shut down by us. On a cluster every node needs
fedlatent importable: install it in the nodes' environment, or pass ``runtime_env`` (e.g.
``{"working_dir": ".", "pip": ["torch", ...]}``, see Ray's runtime environments).
"""
from __future__ import annotations

import logging
import socket
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping

from .utils import FedLatentError

log = logging.getLogger("fedlatent.parallel")

BACKENDS = ("serial", "ray")
DEFAULT_OBJECT_STORE_BYTES = 1 << 30  # local Ray: 1 GiB of shared memory instead of Ray's 30 % of RAM
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """``import ray`` with a one-line FedLatentError when it is missing."""
    try:
        import ray
    except ImportError as e:
        raise FedLatentError(f"--backend ray needs Ray: pip install 'fedlatent[ray]' ({e})") from None
    return ray


def _client_id(args: tuple) -> int | None:
    """The client a job belongs to: the ``client_id`` of its ClientData / Upload argument (None if none)."""
    from .fl.base import ClientData, Upload

    for a in args:
        if isinstance(a, (ClientData, Upload)):
            return int(a.client_id)
    return None


def _run_job(fn: Callable, threads: int, *args: Any) -> Any:
    """The body of a Ray task: fix the thread count, then ``fn(*args)``."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


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
    PyTorch threads. ``retries``: extra attempts of a failed task. ``num_cpus`` / ``num_gpus`` /
    ``object_store_memory``: resources of a local instance (ignored with ``address``). ``runtime_env``: Ray
    runtime environment of the tasks (for clusters whose nodes lack fedlatent).
    """

    def __init__(self, address: str | None = None, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                 retries: int = 1, num_cpus: int | None = None, num_gpus: int | None = None,
                 object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
                 runtime_env: Mapping[str, Any] | None = None, log_to_driver: bool = False):
        if not (isinstance(cpus_per_client, (int, float)) and cpus_per_client > 0):
            raise FedLatentError(f"ray: cpus per client must be > 0, got {cpus_per_client!r}")
        if not (isinstance(gpus_per_client, (int, float)) and gpus_per_client >= 0):
            raise FedLatentError(f"ray: gpus per client must be >= 0, got {gpus_per_client!r}")
        if gpus_per_client > 1 and gpus_per_client != int(gpus_per_client):
            raise FedLatentError(f"ray: gpus per client above 1 must be a whole number, got {gpus_per_client}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise FedLatentError(f"ray: retries must be an integer >= 0, got {retries!r}")
        self.address = address or None
        self.cpus_per_client = float(cpus_per_client)
        self.gpus_per_client = float(gpus_per_client)
        self.retries = int(retries)
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
                "gpus_per_client": self.gpus_per_client, "retries": self.retries}

    def __repr__(self) -> str:
        return f"RayBackend({', '.join(f'{k}={v!r}' for k, v in self.describe().items() if k != 'name')})"

    def __getstate__(self) -> dict:
        # A strategy that holds our client_map (FedDGM.distill_map) is pickled into tasks: ship the settings
        # only, never the connection state.
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
        self._remote = ray.remote(_run_job).options(
            num_cpus=self.cpus_per_client, num_gpus=self.gpus_per_client, max_retries=self.retries,
            retry_exceptions=True)
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

        A job that still fails after ``retries`` retries yields a :class:`~fedlatent.fl.simulation.ClientFailure`.
        """
        from .fl.simulation import ClientFailure

        jobs = [tuple(a) for a in jobs]
        if not jobs:
            return []
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
                return _for_worker(a, self.gpus_per_client)  # Ray puts a large single-use argument in the store itself
            if k not in refs:
                refs[k] = ray.put(_for_worker(a, self.gpus_per_client))
            return refs[k]

        fn_ref = ray.put(fn)
        threads = max(1, int(self.cpus_per_client))
        if not self._noted_threads:
            import torch

            self._noted_threads = True
            if torch.get_num_threads() != threads:
                log.info("Ray tasks use %d PyTorch thread(s), this process %d: results can differ from a serial run "
                         "in the last bits (same thread count => identical)", threads, torch.get_num_threads())
        pending = [self._remote.remote(fn_ref, threads, *map(share, args)) for args in jobs]
        refs.clear()  # the pending tasks keep what they need alive
        out: list = []
        for args, ref in zip(jobs, pending):
            try:
                out.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...: reported, not fatal
                cid = _client_id(args)
                msg = _short_error(e)
                log.debug("client %s failed after %d attempt(s): %s", cid, self.retries + 1, msg)  # the caller logs
                out.append(ClientFailure(cid, msg, self.retries + 1))
        return out

    def attach(self, strategy: Any) -> Any:
        """Let a strategy with independent per-client server work use this backend for it (FedDGM's looped
        per-client distillation: ``strategy.distill_map``); returns the strategy."""
        if hasattr(strategy, "distill_map"):
            strategy.distill_map = self.client_map
        return strategy


def _for_worker(a: Any, gpus_per_client: float) -> Any:
    """The context as a worker must see it: a worker sees its own GPUs from index 0, so ``cuda:N`` becomes
    ``cuda``; a CUDA run without GPUs declared per client is refused (Ray hides the GPUs from such tasks)."""
    from .fl.base import FLContext

    if isinstance(a, FLContext) and str(a.device).startswith("cuda"):
        if gpus_per_client <= 0:
            raise FedLatentError("a CUDA run on Ray needs GPUs per client (--ray-gpus-per-client > 0, e.g. 0.25 "
                                 "runs four clients per GPU)")
        if str(a.device) != "cuda":
            return replace(a, device="cuda")
    return a


def _short_error(e: BaseException) -> str:
    """One line: the innermost exception type and message of a Ray error."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
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


def make_backend(backend: "str | RayBackend | None" = "serial", ray_address: str | None = None,
                 **ray_options: Any) -> "RayBackend | None":
    """``"serial"`` / None -> None (the engine's in-process loop); ``"ray"`` -> a new :class:`RayBackend`
    (``ray_address`` and ``ray_options`` go to its constructor); a RayBackend - or any object with
    ``client_map``, ``attach`` and ``describe`` - is returned as it is (and its owner closes it)."""
    if isinstance(backend, RayBackend) or hasattr(backend, "client_map"):  # a backend object (duck-typed)
        if ray_address is not None or ray_options:
            raise FedLatentError("pass Ray settings to the RayBackend itself, not next to it")
        return backend
    if backend in (None, "serial"):
        if ray_address is not None or any(v is not None for v in ray_options.values()):
            raise FedLatentError("the Ray options (--ray-address, --ray-*) need --backend ray")
        return None
    if backend == "ray":
        import_ray()
        if ray_address is not None:
            _probe(ray_address)  # fail before any data is loaded
        return RayBackend(address=ray_address, **{k: v for k, v in ray_options.items() if v is not None})
    raise FedLatentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def click_options(command: Callable) -> Callable:
    """The ``--backend`` / ``--ray-*`` options of a click command (keyword arguments backend, ray_address,
    ray_cpus_per_client, ray_gpus_per_client, ray_retries; see :func:`make_backend`)."""
    import click

    opts = [
        click.option("--backend", type=click.Choice(list(BACKENDS)), default="serial", show_default=True,
                     help="Where clients run: serial (this process, one after the other) or ray (parallel Ray tasks; "
                          "needs pip install 'fedlatent[ray]'). Same seed, same results (with as many PyTorch "
                          "threads here as --ray-cpus-per-client)."),
        click.option("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
                     help="Join this Ray cluster instead of starting a local Ray instance."),
        click.option("--ray-cpus-per-client", type=click.FloatRange(0, min_open=True), default=None,
                     help="CPUs each client task declares (and PyTorch threads it uses). [default: 1]"),
        click.option("--ray-gpus-per-client", type=click.FloatRange(0), default=None,
                     help="GPUs each client task declares, e.g. 0.25 for four clients per GPU. [default: 0]"),
        click.option("--ray-retries", type=click.IntRange(0), default=None,
                     help="Retries of a failed client task (exception or worker crash); a client that still "
                          "fails is left out of its round and recorded. [default: 1]"),
    ]
    for o in reversed(opts):
        command = o(command)
    return command


def backend_from_cli(backend: str, ray_address: str | None, ray_cpus_per_client: float | None,
                     ray_gpus_per_client: float | None, ray_retries: int | None) -> "RayBackend | None":
    """The backend the :func:`click_options` values describe (None for serial)."""
    return make_backend(backend, ray_address, cpus_per_client=ray_cpus_per_client,
                        gpus_per_client=ray_gpus_per_client, retries=ray_retries)


__all__ = ["BACKENDS", "DEFAULT_OBJECT_STORE_BYTES", "RayBackend", "make_backend", "import_ray", "click_options",
           "backend_from_cli"]
