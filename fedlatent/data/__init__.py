"""Datasets for fedlatent.

One registry (:data:`DATASETS`) of image-classification datasets, each loaded into an
:class:`ImageData` bundle of normalised float tensors (NCHW). Files are looked up in this order:
the ``root`` argument (CLI ``--data-root``), the ``FEDLATENT_DATA`` environment variable, then the
torchvision cache (``~/.cache/fedlatent/torchvision`` or ``TORCH_HOME``).

Sources:

* ``npz``-format folders (``train.npz`` / ``test.npz`` with ``x`` uint8 NHWC and ``y`` int64, plus an
  optional ``classes.json``): ``ROOT/<name>/train.npz``. This is how users bring their own data;
  ``--dataset npz:/path/to/folder`` loads any such folder.
* torchvision (``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``) when no npz folder is found;
  it downloads only when ``download=True`` is passed.
* ``digits``: scikit-learn's bundled 8x8 digits, resized; the offline default that always exists.

:func:`inspect_dataset` reports where a dataset would be loaded from without loading the images
(``fedlatent datasets``). Client splits (IID, Dirichlet, balanced Dirichlet, pathological) live
in :mod:`fedlatent.data.partition`.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import FedLatentError


from .core import DATASETS, DatasetInfo, ImageData, _to_tensor, denormalize, normalize  # noqa: F401 - re-exported


def search_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset files, in order."""
    roots: list[Path] = []
    if root:
        roots.append(Path(root).expanduser())
    env = os.environ.get("FEDLATENT_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    roots.append(torchvision_cache())
    return roots


def torchvision_cache() -> Path:
    base = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "fedlatent")
    return Path(base) / "torchvision"


def _load_npz_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise FedLatentError(f"{path}: holds a single .npy array; expected an .npz archive with arrays 'x' and 'y'")
        with z:
            if "x" not in z.files or "y" not in z.files:
                raise FedLatentError(f"{path}: expected arrays 'x' and 'y', found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except FedLatentError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise FedLatentError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    _check_xy(path, x.dtype, x.shape, y)
    return x, y.astype(np.int64)


def _check_xy(path: Path, x_dtype, x_shape: tuple, y: np.ndarray | None) -> None:
    if x_dtype != np.uint8 or len(x_shape) != 4 or x_shape[-1] not in (1, 3):
        raise FedLatentError(
            f"{path}: 'x' must be uint8 of shape (N, H, W, C) with C in (1, 3), got {x_dtype} {tuple(x_shape)}"
        )
    if y is None:
        return
    if y.ndim != 1 or len(y) != x_shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise FedLatentError(f"{path}: 'y' must be an integer vector of length {x_shape[0]}, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise FedLatentError(f"{path}: negative labels in 'y'")


def _npz_summary(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape of 'x' (read from its .npy header only) and the labels 'y' of an npz split."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "x.npy" not in names or "y.npy" not in names:
                raise FedLatentError(f"{path}: expected arrays 'x' and 'y', found {sorted(n[:-4] for n in names)}")
            with zf.open("x.npy") as f:
                version = np.lib.format.read_magic(f)  # then the header only, no pixels
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            with zf.open("y.npy") as f:
                y = np.lib.format.read_array(f, allow_pickle=False)
    except FedLatentError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise FedLatentError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    _check_xy(path, dtype, shape, y)
    return tuple(int(v) for v in shape), y


def _read_classes(cj: Path) -> list[str]:
    try:
        names = json.loads(cj.read_text())
    except (ValueError, OSError) as e:
        raise FedLatentError(f"{cj}: not valid JSON ({e})") from None
    if not isinstance(names, list):
        raise FedLatentError(f"{cj}: expected a JSON list of class names, got {type(names).__name__}")
    return [str(c) for c in names]


def load_npz_folder(folder: str | os.PathLike, name: str | None = None, resize: int | None = None,
                    mean=None, std=None) -> ImageData:
    """Load a folder holding ``train.npz`` and ``test.npz`` (and optionally ``classes.json``)."""
    folder = Path(folder)
    for split in ("train", "test"):
        if not (folder / f"{split}.npz").is_file():
            raise FedLatentError(f"{folder}: missing {split}.npz (expected train.npz and test.npz with x uint8 NHWC, y int64)")
    xtr, ytr = _load_npz_split(folder / "train.npz")
    xte, yte = _load_npz_split(folder / "test.npz")
    if len(xtr) == 0:
        raise FedLatentError(f"{folder / 'train.npz'}: holds no images")
    if xtr.shape[1:] != xte.shape[1:]:
        raise FedLatentError(f"{folder}: train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in shape")
    n_cls = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    classes = [str(i) for i in range(n_cls)]
    cj = folder / "classes.json"
    if cj.is_file():
        classes = _read_classes(cj)
        if len(classes) < n_cls:
            raise FedLatentError(f"{cj}: lists {len(classes)} classes but labels go up to {n_cls - 1}")
    if mean is None or std is None:
        x = xtr.reshape(-1, xtr.shape[-1]).astype(np.float64) / 255.0 if len(xtr) <= 20000 else \
            xtr[:: max(1, len(xtr) // 20000)].reshape(-1, xtr.shape[-1]).astype(np.float64) / 255.0
        mean = tuple(float(v) for v in x.mean(0))
        std = tuple(float(max(v, 1e-3)) for v in x.std(0))
    return ImageData(
        name=name or folder.name,
        x_train=_to_tensor(xtr, mean, std, resize),
        y_train=torch.from_numpy(ytr),
        x_test=_to_tensor(xte, mean, std, resize),
        y_test=torch.from_numpy(yte),
        classes=classes,
        mean=tuple(mean),
        std=tuple(std),
        source=str(folder),
    )


def load_digits(resize: int | None = None, test_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images), upsampled to 32x32 by default."""
    from sklearn.datasets import load_digits as _sk_digits

    info = DATASETS["digits"]
    d = _sk_digits()
    x = (d.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)[..., None]  # N,8,8,1
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):  # stratified split
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), bool)
    test_mask[np.array(test_idx)] = True
    size = resize or info.image_size
    return ImageData(
        name="digits",
        x_train=_to_tensor(x[~test_mask], info.mean, info.std, size),
        y_train=torch.from_numpy(y[~test_mask]),
        x_test=_to_tensor(x[test_mask], info.mean, info.std, size),
        y_test=torch.from_numpy(y[test_mask]),
        classes=[str(i) for i in range(10)],
        mean=info.mean,
        std=info.std,
        source="sklearn.datasets.load_digits (bundled)",
    )


def find_npz_folder(name: str, root=None) -> Path | None:
    info = DATASETS.get(name)
    names = info.folder_names if info else (name,)
    for r in search_roots(root):
        for n in names:
            if (r / n / "train.npz").is_file():
                return r / n
    return None


def _load_torchvision(info: DatasetInfo, root, resize, download: bool) -> ImageData:
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets as tvd
    except Exception as e:  # pragma: no cover - depends on the install
        raise FedLatentError(f"dataset {info.name!r}: torchvision is not importable ({e})") from None
    cls = getattr(tvd, info.torchvision_name)
    tried = []
    for r in search_roots(root):
        tried.append(str(r))
        try:
            tr = cls(str(r), train=True, download=download and r == search_roots(root)[0])
            te = cls(str(r), train=False, download=False)
        except (RuntimeError, OSError):
            continue
        xtr, xte = np.asarray(tr.data), np.asarray(te.data)
        if xtr.ndim == 3:
            xtr, xte = xtr[..., None], xte[..., None]
        ytr, yte = np.asarray(tr.targets, dtype=np.int64), np.asarray(te.targets, dtype=np.int64)
        return ImageData(
            name=info.name,
            x_train=_to_tensor(xtr.astype(np.uint8), info.mean, info.std, resize),
            y_train=torch.from_numpy(ytr),
            x_test=_to_tensor(xte.astype(np.uint8), info.mean, info.std, resize),
            y_test=torch.from_numpy(yte),
            classes=[str(c) for c in tr.classes],
            mean=info.mean,
            std=info.std,
            source=f"torchvision {info.torchvision_name} @ {r}",
        )
    raise FedLatentError(
        f"dataset {info.name!r} not found; looked for an npz folder ({'|'.join(info.folder_names)}/train.npz) and "
        f"torchvision files in: {', '.join(tried)}. Pass --data-root, set FEDLATENT_DATA, or use --download."
    )


def load_dataset(name: str, root: str | os.PathLike | None = None, resize: int | None = None,
                 download: bool = False) -> ImageData:
    """Load a dataset by registry name, ``npz:/path/to/folder`` for any npz folder, or ``hf:/path`` for a Hugging
    Face ``DatasetDict`` saved with ``save_to_disk`` (train and test splits).

    Raises :class:`FedLatentError` with one clear line when the files cannot be found or read.
    """
    if name.startswith("hf:"):  # a Hugging Face DatasetDict saved with save_to_disk (fedlatent.data.hf)
        from .hf import load_hf_folder

        return load_hf_folder(name[3:], resize=resize)
    if name.startswith("npz:"):
        folder = Path(name[4:]).expanduser()
        if not folder.is_dir():
            raise FedLatentError(f"npz dataset folder {folder} does not exist")
        return load_npz_folder(folder, resize=resize)
    name = name.strip().lower()
    if name == "digits":
        return load_digits(resize=resize)
    info = DATASETS.get(name)
    if info is None:
        raise FedLatentError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or npz:/path/to/folder")
    folder = find_npz_folder(name, root)
    if folder is not None:
        return load_npz_folder(folder, name=name, resize=resize, mean=info.mean, std=info.std)
    return _load_torchvision(info, root, resize, download)


def _hint(info: DatasetInfo) -> str:
    folder = info.folder_names[0] if info.folder_names else info.name
    text = f"put {folder}/train.npz and {folder}/test.npz (x uint8 NHWC, y int64) under --data-root or FEDLATENT_DATA"
    if info.torchvision_name:
        text += f", or use --download (torchvision {info.torchvision_name})"
    return text


def inspect_dataset(name: str, root: str | os.PathLike | None = None) -> dict:
    """Where a registry dataset is found and what it holds, reading as little as possible.

    For an npz folder only the labels and the header of ``x`` are read. Returns a dict with
    ``name``, ``found`` (bool), ``source`` ("bundled", "npz folder", "torchvision" or None),
    ``location``, ``shape`` (C, H, W) as loaded, ``num_classes``, ``train`` and ``test`` (image
    counts), ``error`` (what is wrong with files that were found, else None) and ``hint`` (how to
    get the data when it is missing).
    """
    key = name.strip().lower()
    info = DATASETS.get(key)
    if info is None:
        raise FedLatentError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    out = dict(name=info.name, found=False, source=None, location=None,
               shape=(info.channels, info.image_size, info.image_size), num_classes=info.num_classes,
               train=None, test=None, error=None, hint=None)
    if key == "digits":
        d = load_digits()
        out.update(found=True, source="bundled", location=d.source, shape=tuple(d.x_train.shape[1:]),
                   train=len(d.y_train), test=len(d.y_test))
        return out
    folder = find_npz_folder(key, root)
    if folder is not None:
        out.update(found=True, source="npz folder", location=str(folder))
        try:
            if not (folder / "test.npz").is_file():
                raise FedLatentError(f"{folder}: missing test.npz")
            (n_tr, h, w, c), ytr = _npz_summary(folder / "train.npz")
            (n_te, *_), yte = _npz_summary(folder / "test.npz")
            n_cls = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
            if (folder / "classes.json").is_file():
                n_cls = max(n_cls, len(_read_classes(folder / "classes.json")))
            out.update(shape=(c, h, w), num_classes=n_cls, train=n_tr, test=n_te)
        except FedLatentError as e:
            out["error"] = str(e)
        return out
    if info.torchvision_name:
        try:
            from torchvision import datasets as tvd

            cls = getattr(tvd, info.torchvision_name)
        except Exception as e:  # pragma: no cover - depends on the install
            out["hint"] = f"torchvision is not importable ({e}); " + _hint(info)
            return out
        for r in search_roots(root):
            try:
                tr = cls(str(r), train=True, download=False)
                te = cls(str(r), train=False, download=False)
            except (RuntimeError, OSError):
                continue
            x = np.asarray(tr.data)
            c = 1 if x.ndim == 3 else x.shape[-1]
            out.update(found=True, source="torchvision", location=str(r), shape=(c, x.shape[1], x.shape[2]),
                       num_classes=len(tr.classes), train=len(tr), test=len(te))
            return out
    out["hint"] = _hint(info)
    return out


__all__ = [
    "DATASETS", "DatasetInfo", "ImageData", "load_dataset", "load_npz_folder", "load_digits", "search_roots",
    "find_npz_folder", "normalize", "denormalize", "inspect_dataset", "torchvision_cache",
]
