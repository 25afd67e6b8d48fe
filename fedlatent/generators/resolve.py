"""Generators by name for a run: identity (name, sha256, manifest entry), the dataset's default generator and
latent space, and the per-process cache a parallel worker loads a run's generator into."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FedLatentError
from ..utils import sha256_file


def generator_identity(name: str | None) -> tuple[str, str | None, dict | None]:
    """(name, sha256, manifest entry or None) of a manifest name or checkpoint path."""
    from .registry import checkpoint_entry, entry_path, read_manifest

    if name is None:
        return "", None, None
    m = read_manifest()
    if name in m["models"]:
        entry = m["models"][name]
        sha = entry.get("sha256")
        p = entry_path(name, entry)
        if not sha and p.is_file():
            sha = sha256_file(p)
        return name, sha, entry
    p = Path(name).expanduser()
    return name, (sha256_file(p) if p.is_file() else None), checkpoint_entry(p)


def default_generator(dataset: str) -> str | None:
    """The manifest generator for ``dataset``: a built-in checkpoint present on disk first, then a
    downloaded StyleGAN-XL pickle; None when there is none (use ``space="pixel"`` or name one)."""
    from .registry import entry_path, read_manifest

    models = read_manifest()["models"]
    for kind in ("builtin", "stylegan-xl"):
        for name, e in models.items():
            if e.get("kind") == kind and e.get("dataset") == dataset and entry_path(name, e).is_file():
                return name
    return None


def default_space(generator) -> str:
    """F5 for StyleGAN-XL (FedDGM's CIFAR-10 layer); for other generators F_{L // 3} (L = number of layers)."""
    from .builtin import BuiltinStyleGenerator

    if isinstance(getattr(generator, "G", None), BuiltinStyleGenerator):
        return f"F{max(0, generator.num_layers // 3)}"
    return f"F{min(5, generator.num_layers)}"


_WORKER_GENERATORS: dict[tuple[str, str], Any] = {}


def worker_generator(name: str, device: str, sha256: str | None = None):
    """The generator ``name`` on ``device``, loaded once per process (a parallel worker's cache, see
    :meth:`fedlatent.fl.methods.feddgm.FedDGM.worker_view`); FedLatentError when the file here is not the one the run recorded (``sha256``)."""
    from . import load_generator

    key = (str(name), str(device))
    if key not in _WORKER_GENERATORS:
        if sha256:
            here = generator_identity(name)[1]
            if here != sha256:
                raise FedLatentError(f"generator {name!r} on this worker (sha256 {here}) is not the run's "
                                     f"(sha256 {sha256}); install the same checkpoint on every node")
        _WORKER_GENERATORS[key] = load_generator(name, device=device)
    return _WORKER_GENERATORS[key]



__all__ = ["generator_identity", "default_generator", "default_space", "worker_generator"]
