"""The distilled-set file format: ``distilled.safetensors``.

A distilled set is a plain safetensors file (no pickle) holding

tensors
    ``images``   ``[N, C, H, W]``: float32 in the model's *normalised* input space ``(x01 - mean) / std``
                 (default; this is what FedDF's transfer set reads), or uint8 ``round(255 * x01)``
                 (``image_encoding = "uint8"``; 4x smaller, quantised);
    ``labels``   int64 ``[N]`` class indices (hard) or float32 ``[N, K]`` soft-label logits (optional for an
                 unlabelled transfer set);
    ``clients``  int64 ``[N]``: the client each image was distilled for (-1 = unknown), optional;
    ``rounds``   int64 ``[N]``: the communication round it was distilled in, optional;
    ``ws``       float32 ``[N, num_ws, w_dim]``: the generator's w+ latents (W+ and F_k spaces), optional;
    ``f_k``      float32 ``[N, C_k, H_k, W_k]``: the F_k feature maps (F_k spaces), optional;
    ``soft_labels`` float32 ``[N, K]``: ``softmax(labels)`` when the labels are soft (for readers that want
                 probabilities), optional;
    ``lr``       float32 ``[1]``: the student step size learned with the set (pixel MTT, DynaFed), optional;
    ``loss_history`` float32 ``[T]``: the trajectory-matching loss per iteration, optional.

One format for every distilled set fedlatent writes: FedDGM's pool (``distilled.safetensors``), DynaFed's pseudo
set (``pseudo.safetensors``, soft labels) and pixel MTT (``fedlatent distill-pixels``). :func:`load_distilled`
also reads the files of earlier versions: DynaFed's ``fedlatent.dynafed.pseudo/1`` and the untagged pixel-MTT
file (images, labels, lr with dataset/arch/mean/std metadata).

metadata (the safetensors header, str -> str)
    ``format`` = ``fedlatent.distilled``, ``format_version`` = ``1``, ``dataset``, ``class_names`` (JSON
    list), ``mean`` / ``std`` (JSON lists: the normalisation), ``image_encoding`` (``float-normalized`` |
    ``uint8``), ``label_kind`` (``hard`` | ``soft`` | ``none``), ``generator`` and ``generator_sha256`` (empty
    when pixel space), ``latent_space`` (``F2``, ``W+``, ``pixel``), ``ipc``, ``seed``, ``fedlatent_version`` and
    ``extra`` (JSON object: anything else, e.g. the run's options).

:func:`load_distilled` validates everything and returns a :class:`DistilledDataset` (a ``torch`` Dataset of
``(image, label)`` pairs in the normalised space) and the decoded metadata. Truncated, random or foreign files
raise :class:`~fedlatent.utils.FedLatentError` with a one-line reason.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from .utils import FedLatentError, class_indices, save_safetensors

FORMAT = "fedlatent.distilled"
FORMAT_VERSION = "1"
ENCODINGS = ("float-normalized", "uint8")
LATENT_KEYS = ("ws", "f_k")
_KNOWN = {"images", "labels", "clients", "rounds", *LATENT_KEYS, "soft_labels", "lr", "loss_history"}
LEGACY_PSEUDO_FORMAT = "fedlatent.dynafed.pseudo/1"


class DistilledDataset(Dataset):
    """A distilled set in memory: ``ds[i] -> (image, label)`` with the image in the normalised input space.

    Attributes: ``images`` (float32 ``[N, C, H, W]``, normalised), ``labels`` (int64 ``[N]``, float ``[N, K]``
    logits, or None), ``clients`` / ``rounds`` (int64 ``[N]`` or None), ``latents`` (name -> tensor) and
    ``metadata`` (decoded: lists for ``class_names`` / ``mean`` / ``std``, numbers for ``ipc`` / ``seed``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, metadata: dict[str, Any],
                 clients: torch.Tensor | None = None, rounds: torch.Tensor | None = None,
                 latents: Mapping[str, torch.Tensor] | None = None, lr: float | None = None,
                 loss_history: Sequence[float] | None = None):
        self.images, self.labels, self.metadata = images, labels, metadata
        self.clients, self.rounds = clients, rounds
        self.latents = dict(latents or {})
        self.lr = lr  # the learned student step size, when the set has one
        self.loss_history = None if loss_history is None else [float(v) for v in loss_history]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        if self.labels is None:
            return self.images[i], -1
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.metadata["class_names"])

    @property
    def hard_labels(self) -> torch.Tensor | None:
        """Class indices (argmax for soft labels)."""
        if self.labels is None:
            return None
        return class_indices(self.labels)

    def unit_images(self) -> torch.Tensor:
        """The images in [0, 1] (clamped), for viewing."""
        from .data import denormalize

        return denormalize(self.images, self.metadata["mean"], self.metadata["std"])


def _bad(path: object, msg: str) -> FedLatentError:
    return FedLatentError(f"{path}: {msg}")


def _as_cpu(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if dtype is not None else t).contiguous().clone()


def save_distilled(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor | None, *, dataset: str,
                   class_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                   generator: str | None = None, generator_sha256: str | None = None, latent_space: str = "pixel",
                   ipc: int | None = None, seed: int | None = None, clients: torch.Tensor | None = None,
                   rounds: torch.Tensor | None = None, latents: Mapping[str, torch.Tensor | None] | None = None,
                   extra: Mapping[str, Any] | None = None, uint8: bool = False, lr: float | None = None,
                   loss_history: Sequence[float] | None = None) -> Path:
    """Write a distilled set (atomically) in the format described in the module docstring; returns the path.

    ``images`` are in the normalised input space given by ``mean`` / ``std``; with ``uint8=True`` they are stored
    de-normalised and quantised to 0..255 (lossy). Shapes and values are checked first (FedLatentError).
    """
    from . import __version__
    from .data import denormalize

    path = Path(path)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise FedLatentError(f"images must be a [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    n, c = int(images.shape[0]), int(images.shape[1])
    if len(mean) != c or len(std) != c:
        raise FedLatentError(f"mean/std have {len(mean)}/{len(std)} entries for {c}-channel images")
    if any(not (math.isfinite(float(s)) and float(s) > 0) for s in std):
        raise FedLatentError(f"std must be positive, got {list(std)}")
    if not torch.isfinite(images).all():
        raise FedLatentError("images contain NaN/inf")
    k = len(class_names)
    tensors: dict[str, torch.Tensor] = {}
    if uint8:
        x01 = denormalize(images.detach().float().cpu(), mean, std)
        tensors["images"] = (x01 * 255.0).round().to(torch.uint8).contiguous()
    else:
        tensors["images"] = _as_cpu(images, torch.float32)
    label_kind = "none"
    if labels is not None:
        if labels.dtype.is_floating_point:
            if labels.shape != (n, k) or not torch.isfinite(labels).all():
                raise FedLatentError(f"soft labels must be finite [{n}, {k}] logits, got {tuple(labels.shape)}")
            tensors["labels"], label_kind = _as_cpu(labels, torch.float32), "soft"
            tensors["soft_labels"] = torch.softmax(tensors["labels"], 1).contiguous()
        else:
            if labels.shape != (n,):
                raise FedLatentError(f"hard labels must have shape [{n}], got {tuple(labels.shape)}")
            if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
                raise FedLatentError(f"labels must be in 0..{k - 1}")
            tensors["labels"], label_kind = _as_cpu(labels, torch.int64), "hard"
    for name, t in (("clients", clients), ("rounds", rounds)):
        if t is not None:
            if tuple(t.shape) != (n,) or t.dtype.is_floating_point:
                raise FedLatentError(f"{name} must be an integer [{n}] tensor, got {tuple(t.shape)} {t.dtype}")
            tensors[name] = _as_cpu(t, torch.int64)
    for name, t in (latents or {}).items():
        if t is None:
            continue
        if name not in LATENT_KEYS:
            raise FedLatentError(f"unknown latent tensor {name!r} (known: {', '.join(LATENT_KEYS)})")
        if t.shape[0] != n:
            raise FedLatentError(f"latent {name!r} has {t.shape[0]} rows for {n} images")
        tensors[name] = _as_cpu(t, torch.float32)
    if lr is not None:
        if not math.isfinite(float(lr)):
            raise FedLatentError(f"lr must be finite, got {lr}")
        tensors["lr"] = torch.tensor([float(lr)], dtype=torch.float32)
    if loss_history is not None:
        tensors["loss_history"] = torch.tensor([float(v) for v in loss_history], dtype=torch.float32)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": str(dataset),
        "class_names": json.dumps([str(s) for s in class_names]), "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]), "image_encoding": ENCODINGS[1] if uint8 else ENCODINGS[0],
        "label_kind": label_kind, "generator": generator or "", "generator_sha256": generator_sha256 or "",
        "latent_space": str(latent_space), "ipc": "" if ipc is None else str(int(ipc)),
        "seed": "" if seed is None else str(int(seed)), "fedlatent_version": __version__,
        "extra": json.dumps(dict(extra or {}), default=str, sort_keys=True),
    }
    save_safetensors(path, tensors, meta)  # canonical header: same content, same bytes
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw header metadata of a distilled set (validated as ours); no tensors are read."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FedLatentError(f"{p}: no such distilled set")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _bad(p, f"not a readable safetensors file (truncated or corrupted: {reason})") from None
    if raw.get("format") != FORMAT:
        raise _bad(p, "a safetensors file without fedlatent distilled-set metadata (foreign file); "
                      "expected format=fedlatent.distilled")
    if raw.get("format_version") != FORMAT_VERSION:
        raise _bad(p, f"distilled-set format version {raw.get('format_version')!r} is not supported "
                      f"(this fedlatent reads version {FORMAT_VERSION})")
    return raw


def _decode_meta(p: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(raw)
    try:
        for key in ("class_names", "mean", "std", "extra"):
            meta[key] = json.loads(raw.get(key, "null"))
    except ValueError as e:
        raise _bad(p, f"corrupted metadata ({e})") from None
    if not isinstance(meta["class_names"], list) or not meta["class_names"]:
        raise _bad(p, "metadata 'class_names' must be a non-empty JSON list")
    for key in ("mean", "std"):
        v = meta[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) for x in v):
            raise _bad(p, f"metadata {key!r} must be a JSON list of numbers")
    if not all(x > 0 for x in meta["std"]):
        raise _bad(p, "metadata 'std' must be positive")
    if meta.get("image_encoding") not in ENCODINGS:
        raise _bad(p, f"unknown image_encoding {meta.get('image_encoding')!r}")
    for key in ("ipc", "seed"):
        s = raw.get(key, "")
        try:
            meta[key] = int(s) if s != "" else None
        except ValueError:
            raise _bad(p, f"metadata {key!r} is not an integer: {s!r}") from None
    meta["extra"] = meta["extra"] if isinstance(meta["extra"], dict) else {}
    return meta


def load_distilled(path: str | os.PathLike) -> tuple[DistilledDataset, dict[str, Any]]:
    """Read and validate a ``distilled.safetensors``: returns ``(dataset, metadata)``.

    Images come back as float32 in the normalised input space (uint8 files are de-quantised and
    normalised). Raises FedLatentError for a missing, truncated, corrupted or foreign file, or for
    tensors inconsistent with each other or with the metadata.
    """
    from safetensors.torch import load_file

    p = Path(path)
    legacy = _legacy_kind(p)
    if legacy is not None:
        return _load_legacy(p, legacy)
    meta = _decode_meta(p, read_metadata(p))
    try:
        t = load_file(str(p))
    except Exception as e:  # noqa: BLE001
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _bad(p, f"tensor data unreadable (truncated or corrupted: {reason})") from None
    unknown = sorted(set(t) - _KNOWN)
    if unknown:
        raise _bad(p, f"unexpected tensors {unknown}")
    if "images" not in t:
        raise _bad(p, "no 'images' tensor")
    x = t["images"]
    if x.ndim != 4:
        raise _bad(p, f"'images' must be [N, C, H, W], got {tuple(x.shape)}")
    n, c = int(x.shape[0]), int(x.shape[1])
    if len(meta["mean"]) != c or len(meta["std"]) != c:
        raise _bad(p, f"normalisation has {len(meta['mean'])} channel(s) but the images have {c}")
    if meta["image_encoding"] == "uint8":
        if x.dtype != torch.uint8:
            raise _bad(p, f"image_encoding uint8 but 'images' is {x.dtype}")
        from .data import normalize

        x = normalize(x.float() / 255.0, meta["mean"], meta["std"]).contiguous()
    else:
        if not x.dtype.is_floating_point:
            raise _bad(p, f"'images' must be floating point (float-normalized), got {x.dtype}")
        x = x.float()
    if not torch.isfinite(x).all():
        raise _bad(p, "'images' contain NaN/inf")
    k = len(meta["class_names"])
    labels = t.get("labels")
    if labels is not None:
        if labels.dtype.is_floating_point:
            if tuple(labels.shape) != (n, k) or not torch.isfinite(labels).all():
                raise _bad(p, f"soft 'labels' must be finite [{n}, {k}], got {tuple(labels.shape)}")
        else:
            if tuple(labels.shape) != (n,):
                raise _bad(p, f"'labels' must have shape [{n}], got {tuple(labels.shape)}")
            labels = labels.long()
            if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
                raise _bad(p, f"'labels' out of range 0..{k - 1}")
    for name in ("clients", "rounds"):
        v = t.get(name)
        if v is not None and (tuple(v.shape) != (n,) or v.dtype.is_floating_point):
            raise _bad(p, f"{name!r} must be an integer [{n}] tensor, got {tuple(v.shape)} {v.dtype}")
    latents = {k_: t[k_] for k_ in LATENT_KEYS if k_ in t}
    for name, v in latents.items():
        if v.shape[0] != n:
            raise _bad(p, f"latent {name!r} has {v.shape[0]} rows for {n} images")
    lr = t.get("lr")
    if lr is not None and (lr.numel() != 1 or not torch.isfinite(lr).all()):
        raise _bad(p, f"'lr' must be one finite number, got shape {tuple(lr.shape)}")
    hist = t.get("loss_history")
    ds = DistilledDataset(x, labels, meta, clients=t.get("clients"), rounds=t.get("rounds"), latents=latents,
                          lr=None if lr is None else float(lr.reshape(())),
                          loss_history=None if hist is None else hist.tolist())
    return ds, meta


# ---------------------------------------------------------------------------------------------
# Files of earlier versions


def _legacy_kind(p: Path) -> str | None:
    """"pseudo" (DynaFed ``fedlatent.dynafed.pseudo/1``), "pixels" (the untagged pixel-MTT file) or None."""
    from safetensors import safe_open

    if not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            raw, keys = dict(f.metadata() or {}), set(f.keys())
    except Exception:  # noqa: BLE001 - not readable: read_metadata reports it
        return None
    if raw.get("format") == LEGACY_PSEUDO_FORMAT:
        return "pseudo"
    if "format" not in raw and {"images", "labels", "lr"} <= keys and {"dataset", "arch", "mean", "std"} <= set(raw):
        return "pixels"
    return None


def _load_legacy(p: Path, kind: str) -> tuple[DistilledDataset, dict[str, Any]]:
    """A file of an earlier version as a :class:`DistilledDataset` with the current metadata keys."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        t = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            raw = dict(f.metadata() or {})
        if kind == "pseudo":
            info = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        else:
            info = {"dataset": raw["dataset"], "arch": raw["arch"], "zca": raw.get("zca") == "True",
                    "mean": json.loads(raw["mean"]), "std": json.loads(raw["std"])}
    except Exception as e:  # noqa: BLE001
        raise _bad(p, f"unreadable file of an earlier fedlatent version ({type(e).__name__}: {e})") from None
    x = t["images"].float()
    labels = t["label_logits"].float() if kind == "pseudo" else t["labels"].long()
    k = int(labels.shape[1]) if kind == "pseudo" else int(labels.max()) + 1 if len(labels) else 1
    c = int(x.shape[1])
    names = info.get("class_names") or [str(i) for i in range(k)]
    mean = info.get("mean") or [0.0] * c
    std = info.get("std") or [1.0] * c
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset": str(info.get("dataset", "")),
            "class_names": list(names), "mean": list(mean), "std": list(std), "image_encoding": ENCODINGS[0],
            "label_kind": "soft" if kind == "pseudo" else "hard", "generator": "", "generator_sha256": "",
            "latent_space": "pixel", "ipc": info.get("ipc"), "seed": info.get("seed"), "fedlatent_version": "",
            "extra": {"legacy_format": LEGACY_PSEUDO_FORMAT if kind == "pseudo" else "pixel-mtt", **info}}
    hist = t.get("synthesis_loss")
    ds = DistilledDataset(x, labels, meta, lr=float(t["lr"].reshape(-1)[0]),
                          loss_history=None if hist is None else hist.tolist())
    return ds, meta


__all__ = ["FORMAT", "FORMAT_VERSION", "DistilledDataset", "save_distilled", "load_distilled", "read_metadata"]
