"""Flower integration: run fedlatent methods (FedDGM, DynaFed, FedAvg, FedProx) on Flower (flwr >= 1.21).

Install with ``pip install 'fedlatent[flower]'``. Pieces:

* :class:`~fedlatent.flower.strategy.FedLatentStrategy`: a Message-API ``flwr.serverapp.strategy.Strategy``
  wrapping a fedlatent Strategy; FedDGM's / DynaFed's server-side distillation runs in ``aggregate_train``;
* ``fedlatent.flower.server_app:app`` / ``fedlatent.flower.client_app:app``: the ServerApp and ClientApp
  of ``flwr run`` (see ``examples/flower``);
* :func:`run_simulation`: an in-process Flower simulation (virtual SuperNodes on Ray), comparable to
  :func:`fedlatent.fl.simulation.simulate`.

Importing this package is cheap and works without Flower; using any of the above without ``flwr`` raises
:class:`~fedlatent.utils.FedLatentError`.
"""
from __future__ import annotations

import importlib
import importlib.util

from ..utils import FedLatentError

MIN_FLWR = (1, 21)
INSTALL_HINT = "install the Flower extra: pip install 'fedlatent[flower]'"

_LAZY = {
    "run_simulation": ("fedlatent.flower.simulation", "run_simulation"),
    "FedLatentStrategy": ("fedlatent.flower.strategy", "FedLatentStrategy"),
    "FlowerSimulationResult": ("fedlatent.flower.strategy", "FlowerSimulationResult"),
    "make_server_app": ("fedlatent.flower.server_app", "make_server_app"),
    "run_server": ("fedlatent.flower.server_app", "run_server"),
}


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def require_flwr(simulation: bool = False) -> None:
    """Raise FedLatentError unless flwr >= 1.21 (and, for ``simulation``, Ray) can be imported."""
    try:
        import flwr
    except ImportError:
        raise FedLatentError(f"the Flower integration needs flwr (not installed); {INSTALL_HINT}") from None
    version = getattr(flwr, "__version__", "0")
    if _version(version) < MIN_FLWR:
        raise FedLatentError(f"the Flower integration needs flwr >= {'.'.join(map(str, MIN_FLWR))}, found {version}; "
                             f"{INSTALL_HINT}")
    if simulation:
        if importlib.util.find_spec("ray") is None:
            raise FedLatentError(f"Flower simulations need Ray (not installed); {INSTALL_HINT}")


def __getattr__(name: str):
    if name in _LAZY:
        require_flwr()
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fedlatent.flower' has no attribute {name!r}")


__all__ = ["require_flwr", "run_simulation", "FedLatentStrategy", "FlowerSimulationResult", "make_server_app",
           "run_server", "MIN_FLWR"]
