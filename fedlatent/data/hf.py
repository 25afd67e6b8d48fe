"""Hugging Face datasets and Flower Datasets partitioners as fedlatent data (offline: nothing is downloaded).

* ``--dataset hf:PATH`` / :func:`load_hf_folder`: a ``datasets.DatasetDict`` saved with ``save_to_disk`` (arrow
  files, no pickle), with a ``train`` and a ``test`` split. fedlatent partitions it with its own schemes.
* :func:`from_partitioner`: the partitions of a ``flwr_datasets`` partitioner (``IidPartitioner``,
  ``DirichletPartitioner``, ...) as the clients' data: client ``c`` gets exactly ``partitioner.load_partition(c)``.
  Pass the result to :func:`fedlatent.fl.simulate` / :func:`fedlatent.distill_federated` as ``data=`` with
  ``clients=partitioner.num_partitions``; ``--partition`` / ``alpha`` are then not used.

The image column is the one of feature type ``Image`` (else ``image`` / ``img`` / ``pixel_values``), the label
column the ``ClassLabel`` one (else ``label`` / ``labels`` / ``fine_label``); both can be named. Images are
uint8 (or float in [0, 1]) HWC or HW arrays; mean / std are computed on the training images.
Needs the ``flwr-datasets`` extra (``pip install 'fedlatent[flwr-datasets]'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..utils import FedLatentError
from .core import ImageData, _to_tensor

IMAGE_KEYS = ("image", "img", "pixel_values", "x")
LABEL_KEYS = ("label", "labels", "fine_label", "y")
PARTITIONS_KEY = "partitions"  # ImageData.extra[...]: the clients' training-set indices, given by the data


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise FedLatentError("Hugging Face / Flower datasets need the datasets package: "
                             "pip install 'fedlatent[flwr-datasets]'") from None
    return datasets


def columns(ds, image_key: str | None = None, label_key: str | None = None) -> tuple[str, str]:
    """The image and label column names of a ``datasets.Dataset`` (see the module docstring)."""
    datasets = _require_datasets()
    feats = ds.features
    names = list(feats)

    def pick(given, kind, keys):
        if given is not None:
            if given not in feats:
                raise FedLatentError(f"the dataset has no column {given!r} (columns: {', '.join(names)})")
            return given
        typed = [k for k, f in feats.items() if isinstance(f, kind)]
        if typed:
            return typed[0]
        named = [k for k in keys if k in feats]
        if named:
            return named[0]
        raise FedLatentError(f"no {'image' if kind is datasets.Image else 'label'} column found among "
                             f"{', '.join(names)}; name it (image_key= / label_key=)")

    return pick(image_key, datasets.Image, IMAGE_KEYS), pick(label_key, datasets.ClassLabel, LABEL_KEYS)


def to_arrays(ds, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [N, H, W, C], y int64 [N])`` of a ``datasets.Dataset``."""
    ds = ds.with_format("numpy", columns=[image_key, label_key])
    imgs = [np.asarray(v) for v in ds[image_key]]
    if not imgs:
        raise FedLatentError("the dataset holds no images")
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise FedLatentError(f"images of different shapes {sorted(shapes)[:3]}; resize them to one size first")
    x = np.stack(imgs)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise FedLatentError(f"images must be HW or HWC with 1/3/4 channels, got {x.shape[1:]}")
    if x.shape[-1] == 4:
        x = x[..., :3]  # drop alpha
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 1:
            raise FedLatentError(f"images must be uint8 or float in [0, 1], got {x.dtype} in [{x.min()}, {x.max()}]")
        x = (x * 255.0).round().astype(np.uint8)
    y = np.asarray(ds[label_key]).astype(np.int64)
    if y.ndim != 1 or (len(y) and y.min() < 0):
        raise FedLatentError(f"labels must be non-negative class indices, got shape {y.shape}")
    return np.ascontiguousarray(x), y


def _class_names(ds, label_key: str, n_cls: int) -> list[str]:
    datasets = _require_datasets()
    f = ds.features[label_key]
    if isinstance(f, datasets.ClassLabel):
        return [str(n) for n in f.names]
    return [str(i) for i in range(n_cls)]


def from_datasets(train, test, *, name: str, resize: int | None = None, image_key: str | None = None,
                  label_key: str | None = None, source: str = "", train_parts: Sequence[Any] | None = None,
                  ) -> ImageData:
    """An :class:`ImageData` from two ``datasets.Dataset`` (or, with ``train_parts``, the clients' datasets, which
    are concatenated in order and recorded as the partition)."""
    parts_ds = list(train_parts) if train_parts is not None else [train]
    ref = parts_ds[0] if train is None else train
    ik, lk = columns(ref, image_key, label_key)
    arrays = [to_arrays(d, ik, lk) if len(d) else None for d in parts_ds]
    shape = next((a[0].shape[1:] for a in arrays if a is not None), None)
    if shape is None:
        raise FedLatentError("the training set holds no images")
    arrays = [a if a is not None else (np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)) for a in arrays]
    xtr, ytr = np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])
    xte, yte = to_arrays(test, *columns(test, ik, lk))
    if xtr.shape[1:] != xte.shape[1:]:
        raise FedLatentError(f"train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in shape")
    n_cls = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    classes = _class_names(ref, lk, n_cls)
    if len(classes) < n_cls:
        raise FedLatentError(f"the label column names {len(classes)} classes but labels go up to {n_cls - 1}")
    x = xtr.reshape(-1, xtr.shape[-1]).astype(np.float64) / 255.0
    mean = tuple(float(v) for v in x.mean(0))
    std = tuple(float(max(v, 1e-3)) for v in x.std(0))
    extra: dict[str, Any] = {}
    if train_parts is not None:
        bounds = np.cumsum([0] + [len(a[1]) for a in arrays])
        extra[PARTITIONS_KEY] = [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(len(arrays))]
    return ImageData(name=name, x_train=_to_tensor(xtr, mean, std, resize), y_train=torch.from_numpy(ytr),
                     x_test=_to_tensor(xte, mean, std, resize), y_test=torch.from_numpy(yte), classes=classes,
                     mean=mean, std=std, source=source, extra=extra)


def load_hf_folder(path: str | os.PathLike, resize: int | None = None, image_key: str | None = None,
                   label_key: str | None = None, train_split: str = "train", test_split: str = "test") -> ImageData:
    """``datasets.load_from_disk(path)`` (a DatasetDict with ``train`` and ``test``) as an :class:`ImageData`."""
    datasets = _require_datasets()
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FedLatentError(f"hf dataset folder {p} does not exist (save one with DatasetDict.save_to_disk)")
    try:
        dd = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise FedLatentError(f"{p}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    if not isinstance(dd, datasets.DatasetDict) or train_split not in dd or test_split not in dd:
        have = list(dd) if isinstance(dd, datasets.DatasetDict) else "one split"
        raise FedLatentError(f"{p}: needs a DatasetDict with {train_split!r} and {test_split!r} splits (has {have})")
    return from_datasets(dd[train_split], dd[test_split], name=p.name, resize=resize, image_key=image_key,
                         label_key=label_key, source=f"hf:{p}")


def from_partitioner(partitioner, test, *, train=None, name: str | None = None, resize: int | None = None,
                     image_key: str | None = None, label_key: str | None = None) -> ImageData:
    """The partitions of a Flower Datasets ``partitioner`` as the clients' data; ``test``: the central test set.

    ``train`` (a ``datasets.Dataset``) is assigned to the partitioner when given (else it must have one). The
    returned data hold the partitions in order (client ``c`` = ``partitioner.load_partition(c)``); run them with
    ``clients=partitioner.num_partitions``.
    """
    _require_datasets()
    if train is not None:
        partitioner.dataset = train
    if not partitioner.is_dataset_assigned():
        raise FedLatentError("the partitioner has no dataset: pass train= or set partitioner.dataset first")
    parts = [partitioner.load_partition(i) for i in range(partitioner.num_partitions)]
    data = from_datasets(None, test, name=name or type(partitioner).__name__, resize=resize, image_key=image_key,
                         label_key=label_key, source=f"flwr_datasets {type(partitioner).__name__}", train_parts=parts)
    data.extra["partitioner"] = f"{type(partitioner).__name__} ({partitioner.num_partitions} partitions)"
    return data


def given_partitions(data: ImageData, num_clients: int) -> list[np.ndarray] | None:
    """The clients' training-set indices carried by ``data`` (None: fedlatent partitions it), checked."""
    parts = (data.extra or {}).get(PARTITIONS_KEY)
    if parts is None:
        return None
    if len(parts) != num_clients:
        raise FedLatentError(f"the data carry {len(parts)} partitions (from {data.extra.get('partitioner', 'the data')})"
                             f" but the run has {num_clients} clients; set clients={len(parts)}")
    n = int(len(data.y_train))
    idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != len(idx)):
        raise FedLatentError("given partitions must be disjoint index sets into the training set")
    return [np.asarray(p, dtype=np.int64) for p in parts]


__all__ = ["load_hf_folder", "from_partitioner", "from_datasets", "given_partitions", "columns", "to_arrays"]
