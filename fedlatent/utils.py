"""Small shared helpers: seeding, seed derivation, atomic file writes, errors."""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .errors import DivergedError, FedLatentError  # noqa: F401 - re-exported (fedlatent.utils.FedLatentError)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and any number of keys.

    Independent streams (partition, schedule, client c in round r, ...) each get their own seed,
    so adding a client or a round never shifts the random numbers of another stream.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(str(k) for k in keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def torch_generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file atomically: ``write(tmp_path)`` then rename over ``path``.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file as bytes, with a canonical header: the same tensors and metadata give the same bytes.

    ``safetensors`` writes the ``__metadata__`` entries in the iteration order of a Rust ``HashMap``, which is
    randomised per map, so two saves of the same content differ in their header bytes (safetensors issue #584).
    The header is rewritten here with the metadata keys sorted (tensor entries and data are kept as written:
    they are already ordered by dtype alignment and name); the result is still a plain safetensors file.
    """
    import json
    import struct

    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data buffer to 8 bytes with trailing spaces
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write :func:`safetensors_bytes` to ``path`` atomically (a crash leaves the previous file intact)."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def class_indices(labels: torch.Tensor) -> torch.Tensor:
    """Class indices of hard labels ``[N]`` or of soft-label logits ``[N, K]`` (their argmax)."""
    return labels.argmax(1) if labels.dtype.is_floating_point else labels


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
