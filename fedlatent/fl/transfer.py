"""Transfer / public data for knowledge-distillation methods (FedDF's transfer set, FedMD's public data).

Sources (the ``transfer`` option of FedDF):

* ``public``: the public split of the training set (``FLConfig.public_fraction`` > 0). The split is
  drawn by :func:`public_private_split` before the clients' partition, which only sees the private
  part, so the transfer set never overlaps client data. Its labels are ignored by FedDF.
* ``file:PATH`` (or any ``PATH`` ending in ``.safetensors``): a fedlatent distilled set. For now the
  format is a safetensors file with an ``images`` tensor ``[N, C, H, W]`` (float, already in the
  dataset's normalised model-input space) and an optional ``labels`` tensor (``[N]`` integer class ids
  or ``[N, classes]`` soft labels). Loaded with ``safetensors.torch.load_file`` (no pickle).
* ``generator:NAME``: images sampled from a class-conditional generator of
  :func:`fedlatent.generators.load_generator` (a manifest name or a ``.safetensors``/``.pkl`` path),
  class-balanced labels, seeded z, mapped to [0, 1], resized to the dataset's image size and normalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import FedLatentError, numpy_rng, torch_generator


@dataclass
class TransferSet:
    """Images in model-input space (``x``, float32 NCHW), optional labels, and where they came from."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def public_private_split(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of sample indices into (public, private), disjoint and covering all samples.

    The public part holds ``round(fraction * N)`` samples (at least one when ``fraction > 0``), shared
    among the classes in proportion to their sizes by largest-remainder rounding; the samples of each
    class come from a seeded permutation (stream (seed, "public-split")). Both index arrays are sorted.
    """
    from .hetero import largest_remainder

    y = np.asarray(labels).reshape(-1)
    n = len(y)
    if not 0.0 <= fraction < 1.0:
        raise FedLatentError(f"public fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or n == 0:
        return np.zeros(0, dtype=np.int64), np.arange(n, dtype=np.int64)
    total = max(1, int(math.floor(fraction * n + 0.5)))
    if total >= n:
        raise FedLatentError(f"public fraction {fraction} leaves no private training data ({n} samples)")
    classes, sizes = np.unique(y, return_counts=True)
    per_class = largest_remainder(sizes.astype(np.float64), total)
    rng = numpy_rng(seed, "public-split")
    public = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, per_class)]
    pub = np.sort(np.concatenate(public).astype(np.int64))
    mask = np.ones(n, dtype=bool)
    mask[pub] = False
    return pub, np.flatnonzero(mask).astype(np.int64)


def split_validation(n: int, fraction: float, seed: int, *keys: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, validation) index split of ``range(n)``; ``round(fraction * n)`` validation samples.

    With ``fraction > 0`` the validation part has at least one sample and the train part keeps at least one.
    """
    if not 0.0 <= fraction < 1.0:
        raise FedLatentError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))
    perm = torch.randperm(n, generator=torch_generator(seed, "transfer-validation", *keys))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_distilled_set(path: str | Path, channels: int, image_size: int, num_classes: int | None = None) -> TransferSet:
    """Read a distilled set (safetensors: ``images`` [N, C, H, W] float, optional ``labels``) and check it fits the data."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise FedLatentError(f"distilled set {p} not found")
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse error of a user file becomes one line
        msg = " ".join(str(e).split())[:200]
        raise FedLatentError(f"{p}: not a readable safetensors file ({type(e).__name__}: {msg})") from None
    if "images" not in tensors:
        raise FedLatentError(f"{p}: no 'images' tensor (found {sorted(tensors)[:5]})")
    x = tensors["images"]
    if x.dim() != 4 or not x.is_floating_point():
        raise FedLatentError(f"{p}: 'images' must be a float tensor [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n < 1:
        raise FedLatentError(f"{p}: 'images' is empty")
    if c != channels or h != image_size or w != image_size:
        raise FedLatentError(f"{p}: images are {c}x{h}x{w} but the dataset is {channels}x{image_size}x{image_size}")
    if not torch.isfinite(x).all():
        raise FedLatentError(f"{p}: 'images' contains NaN or Inf")
    y = tensors.get("labels")
    if y is not None:
        if y.shape[0] != n or y.dim() not in (1, 2):
            raise FedLatentError(f"{p}: 'labels' must be [N] or [N, classes] with N = {n}, got {tuple(y.shape)}")
        if y.dim() == 1:
            if y.is_floating_point() or y.is_complex():
                raise FedLatentError(f"{p}: 1-D 'labels' must be integer class ids, got {y.dtype}")
            y = y.long()
            if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise FedLatentError(f"{p}: 'labels' outside 0..{num_classes - 1}")
        elif num_classes is not None and y.shape[1] != num_classes:
            raise FedLatentError(f"{p}: soft 'labels' have {y.shape[1]} classes, the dataset {num_classes}")
    return TransferSet(x.float().contiguous(), y, f"file:{p}")


@torch.no_grad()
def generator_transfer_set(name: str, n: int, *, num_classes: int, channels: int, image_size: int,
                           mean: Sequence[float], std: Sequence[float], seed: int, device: str | torch.device = "cpu",
                           batch_size: int = 256) -> TransferSet:
    """``n`` images from generator ``name`` (class-balanced labels ``i % classes``), in model-input space."""
    from ..data import normalize
    from ..generators import load_generator

    if n < 1:
        raise FedLatentError(f"generator transfer set needs a positive size, got {n}")
    G = load_generator(name, device=device)
    if G.img_channels != channels:
        raise FedLatentError(f"generator {name!r} makes {G.img_channels}-channel images, the dataset has {channels}")
    if G.c_dim not in (0, num_classes):
        raise FedLatentError(f"generator {name!r} has {G.c_dim} classes, the dataset {num_classes}")
    labels = torch.arange(n) % num_classes
    gen = torch_generator(seed, "transfer-generator")
    chunks = []
    for i in range(0, n, batch_size):
        lab = labels[i : i + batch_size].to(G.device)
        x01 = G.to_unit(G.sample(lab if G.c_dim else None, generator=gen)).float().clamp(0, 1)
        if x01.shape[-1] != image_size or x01.shape[-2] != image_size:
            x01 = F.interpolate(x01, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                antialias=image_size < x01.shape[-1]).clamp(0, 1)
        chunks.append(normalize(x01, mean, std).to(device))
    return TransferSet(torch.cat(chunks), labels.to(device) if G.c_dim else None, f"generator:{name}")


def load_transfer_set(source: str, ctx, size: int | None = None, seed: int | None = None) -> TransferSet:
    """Resolve a transfer-set ``source`` (``public``, ``file:PATH`` / ``*.safetensors``, ``generator:NAME``) for ``ctx``.

    ``size`` subsamples (seeded) a larger set; it is the number of samples for a generator (default 2000).
    """
    seed = ctx.config.seed if seed is None else seed
    src = str(source).strip()
    if src == "public":
        if ctx.public_x is None or len(ctx.public_x) == 0:
            raise FedLatentError("transfer set 'public' needs a public split of the training set: "
                                 "set --public-fraction (FLConfig.public_fraction) > 0")
        ts = TransferSet(ctx.public_x, ctx.public_y, "public")
    elif src.startswith("generator:"):
        name = src[len("generator:"):].strip()
        if not name:
            raise FedLatentError("transfer set 'generator:NAME' needs a generator name or path")
        if ctx.mean is None or ctx.std is None:
            raise FedLatentError("a generator transfer set needs the dataset normalisation (ctx.mean / ctx.std)")
        return generator_transfer_set(name, int(size or 2000), num_classes=ctx.num_classes, channels=ctx.channels,
                                      image_size=ctx.image_size, mean=ctx.mean, std=ctx.std, seed=seed,
                                      device=ctx.device)
    elif src.startswith("file:") or src.lower().endswith(".safetensors"):
        path = src[len("file:"):] if src.startswith("file:") else src
        ts = load_distilled_set(path, ctx.channels, ctx.image_size, ctx.num_classes)
        ts = TransferSet(ts.x.to(ctx.device), None if ts.y is None else ts.y.to(ctx.device), ts.source)
    else:
        raise FedLatentError(f"unknown transfer set {source!r}: use public, file:PATH (.safetensors) or generator:NAME")
    if size is not None and 0 < size < len(ts):
        idx = torch.from_numpy(np.sort(numpy_rng(seed, "transfer-subsample").choice(len(ts), size, replace=False)))
        idx = idx.to(ts.x.device)
        ts = TransferSet(ts.x.index_select(0, idx), None if ts.y is None else ts.y.index_select(0, idx), ts.source)
    return ts


__all__ = ["TransferSet", "public_private_split", "split_validation", "load_distilled_set", "generator_transfer_set",
           "load_transfer_set"]
