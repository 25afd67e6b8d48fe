"""In-process Flower simulation of a fedlatent method: ServerApp + ClientApp on Flower's Ray engine.

:func:`run_simulation` is the Flower counterpart of :func:`fedlatent.fl.simulation.simulate`: same options,
same seed semantics, and it returns the same kind of result (``history`` rows as in metrics.csv), so the two
can be compared directly - on CPU they give identical metrics (see ``tests/test_flower.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..utils import FedLatentError
from .spec import make_spec, split_options


@contextlib.contextmanager
def _flower_logging(verbose: bool) -> Iterator[None]:
    """Flower logs every round at INFO and warns that its Python API is deprecated; keep that quiet unless asked."""
    logger = logging.getLogger("flwr")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_simulation(method: str = "fedavg", num_clients: int = 4, rounds: int = 2, seed: int = 0, *,
                   dataset: str = "digits", data_root: str | os.PathLike | None = None, image_size: int | None = None,
                   method_options: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
                   overwrite: bool = False, exclude_public: bool = False, progress: bool = False,
                   verbose: bool = False, client_cpus: float = 1.0, client_gpus: float = 0.0,
                   ray_cpus: int | None = None, object_store_mb: int | None = 512, timeout: float = 3600.0,
                   **options: Any):
    """Run ``method`` for ``rounds`` rounds on ``num_clients`` virtual Flower SuperNodes (Ray backend).

    ``options``: :class:`~fedlatent.fl.base.FLConfig` fields (participation, alpha, local_epochs, lr, model, ...)
    and the method's constructor arguments (ipc, iterations, generator, ...), split automatically;
    ``method_options`` may give the latter explicitly. ``dataset`` / ``data_root`` / ``image_size`` as in
    :func:`fedlatent.fl.simulation.simulate` (``digits`` defaults to 16 px); ``exclude_public`` removes the
    generator's public split from the clients' data (as ``fedlatent distill`` does). ``out`` writes a run folder
    (config.json, metrics.csv, accuracy.png, summary.json, the method's artefacts and its distilled set).

    Ray: each virtual client reserves ``client_cpus`` CPUs (and ``client_gpus`` GPUs); Ray gets ``ray_cpus`` CPUs
    in all (default: every CPU) and an object store of ``object_store_mb`` MiB (None: Ray's default). Ray
    already initialised in this process is reused; otherwise a new local instance is started - never a cluster
    named by ``RAY_ADDRESS`` or a running ``ray start`` (``ray.init(address="local")``) - and Flower shuts it
    down at the end. ``timeout``: seconds the ServerApp waits for the SuperNodes and for each round's replies
    (a stuck client makes the run fail instead of hanging).

    Returns a :class:`~fedlatent.flower.strategy.FlowerSimulationResult` (``history``, ``final_accuracy``, the
    server-side ``strategy`` with e.g. FedDGM's ``pool``, ``nodes``, ``distilled``).
    """
    from . import require_flwr

    t0 = time.perf_counter()
    require_flwr(simulation=True)
    if "clients" in options and options["clients"] != num_clients:
        raise FedLatentError("give the number of clients once (num_clients)")
    options.pop("clients", None)
    cfg, meth = split_options(method, options)
    overlap = sorted(set(meth) & set(method_options or {}))
    if overlap:
        raise FedLatentError(f"method option(s) {', '.join(overlap)} given twice (options and method_options)")
    meth = {**dict(method_options or {}), **meth}
    if "progress" in _init_params(method):
        meth.setdefault("progress", bool(progress))
    spec = make_spec(method, dataset=dataset, image_size=image_size, data_root=data_root,
                     exclude_public=exclude_public, method_options=meth,
                     config={**cfg, "clients": int(num_clients), "rounds": int(rounds), "seed": int(seed)})
    if str(spec.config["device"]).startswith("cuda") and not client_gpus > 0:
        raise FedLatentError("device cuda: give the virtual clients GPUs with client_gpus > 0 (e.g. 0.25 lets four "
                             "clients share one GPU); Ray hides the GPUs from clients that reserve none")
    if out is not None:
        from ..fl.run import RunFolder

        RunFolder.check(out, overwrite)

    from flwr.simulation import run_simulation as flwr_run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    sink: dict[str, Any] = {}
    server_app = make_server_app(spec, sink, out=None if out is None else Path(out), overwrite=overwrite,
                                 timeout=float(timeout), wait_nodes=float(timeout), progress=progress)
    # address="local": without it ray.init() joins the cluster in RAY_ADDRESS or /tmp/ray/ray_current_cluster
    # (and then refuses num_cpus); flwr passes init_args to ray.init as they are.
    init_args: dict[str, Any] = {"address": "local", "num_cpus": int(ray_cpus or os.cpu_count() or 1),
                                 "logging_level": "WARNING" if verbose else "ERROR", "log_to_driver": bool(verbose)}
    if object_store_mb is not None:
        init_args["object_store_memory"] = int(object_store_mb) * 1024 * 1024
    backend_config = {"client_resources": {"num_cpus": float(client_cpus), "num_gpus": float(client_gpus)},
                      "init_args": init_args}
    with _flower_logging(verbose):
        flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=int(num_clients),
                            backend_name="ray", backend_config=backend_config)
    if "result" not in sink:
        raise FedLatentError("the Flower simulation ended without a result (see Flower's log above)")
    res = sink["result"]
    res.total_s = time.perf_counter() - t0
    return res


def _init_params(method: str) -> set[str]:
    from ..fl.base import get_method
    from ..fl.options import option_names

    return option_names(get_method(method))


__all__ = ["run_simulation"]
