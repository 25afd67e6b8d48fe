"""The fedlatent ServerApp: load the test set, wrap the method in :class:`FedLatentStrategy`, run the rounds.

With ``flwr run`` the run is described by the Flower run config (``[tool.flwr.app.config]`` of the app's
pyproject.toml, overridable with ``--run-config``; keys in :func:`fedlatent.flower.spec.spec_from_run_config`);
with the Python API (:func:`fedlatent.flower.run_simulation`) by a :class:`~fedlatent.flower.spec.RunSpec`.
"""
from __future__ import annotations

from . import require_flwr

require_flwr()

import logging
from pathlib import Path
from typing import Any, MutableMapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .spec import SERVER_KEYS, RunSpec, load_data, spec_from_run_config
from .strategy import FedLatentStrategy, FlowerSimulationResult

log = logging.getLogger("fedlatent.flower")


def run_server(grid: Grid, spec: RunSpec, *, out: str | Path | None = None, overwrite: bool = False,
               timeout: float = 3600.0, wait_nodes: float = 300.0, progress: bool = False) -> FlowerSimulationResult:
    """Run ``spec`` on the nodes of ``grid``; returns the run's :class:`FlowerSimulationResult`.

    The server loads the dataset for its test set and normalisation only (its training part is not used).
    """
    data = load_data(spec)
    strategy = FedLatentStrategy(spec, data, out=out, overwrite=overwrite, wait_nodes=wait_nodes, progress=progress)
    del data
    strategy.start(grid, timeout=timeout)
    res = strategy.result()
    log.info("%s", res.line())
    return res


def make_server_app(spec: RunSpec | None = None, sink: MutableMapping[str, Any] | None = None,
                    **server_options: Any) -> ServerApp:
    """A ServerApp running ``spec`` (None: read it from the Flower run config at start).

    ``server_options``: ``out``, ``overwrite``, ``timeout``, ``wait_nodes``, ``progress`` (they override the run
    config's ``out-dir``, ``overwrite``, ...). ``sink["result"]`` receives the :class:`FlowerSimulationResult`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if spec is None:
            run_spec, opts = spec_from_run_config(context.run_config)
        else:
            run_spec, opts = spec, dict(SERVER_KEYS)
        kw = {"out": opts["out-dir"], "overwrite": bool(opts["overwrite"]), "timeout": float(opts["timeout"]),
              "wait_nodes": float(opts["wait-nodes"]), "progress": bool(opts["progress"])}
        kw.update(server_options)
        res = run_server(grid, run_spec, **kw)
        if sink is not None:
            sink["result"] = res

    return server_app


#: The ServerApp of ``flwr run`` (``serverapp = "fedlatent.flower.server_app:app"``).
app = make_server_app()

__all__ = ["app", "make_server_app", "run_server"]
