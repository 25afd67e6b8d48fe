"""Where the clients' work runs: :mod:`.serial` (this process, one job after the other) or :mod:`.ray`
(parallel Ray tasks). A backend supplies ``client_map(fn, jobs) -> [fn(*job) ...]`` (job order kept) to the
round engine; :func:`make_backend` picks one by name. The command-line options are in ``fedlatent.cli._options``.
"""
from __future__ import annotations

from typing import Any

from ..errors import FedLatentError
from .ray import RayBackend, _probe, import_ray
from .serial import sequential_map

BACKENDS = ("serial", "ray")


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


__all__ = ["BACKENDS", "make_backend", "sequential_map", "RayBackend"]
