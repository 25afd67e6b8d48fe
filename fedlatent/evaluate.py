"""Train fresh networks of other architectures on a distilled set and measure real test accuracy.

:func:`evaluate_distilled` loads a ``distilled.safetensors`` (:mod:`fedlatent.export`), loads the real test set of
its data set (at the distilled images' size) and, for every architecture, trains ``len(seeds)`` fresh models on
the distilled images only with :func:`fedlatent.distill.pixels.evaluate_synthetic` (the MTT evaluation protocol:
SGD momentum 0.9, weight decay 5e-4, lr / 10 after half the epochs, DSA on every batch), reporting the mean and
standard deviation of the test accuracy. :func:`real_subset` draws the random real baseline of the same size
(``ipc`` real images per class).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from .utils import FedLatentError


def _load(distilled: Any):
    from .export import DistilledDataset, load_distilled

    if isinstance(distilled, DistilledDataset):
        return distilled, distilled.metadata
    return load_distilled(distilled)


def real_data_for(meta: dict, image_size: int, channels: int, dataset: str | None = None,
                  data_root: str | os.PathLike | None = None):
    """The real data set of a distilled set (``dataset`` overrides the metadata), resized to ``image_size``."""
    from .data import load_dataset

    name = dataset or meta.get("dataset")
    if not name:
        raise FedLatentError("the distilled set does not name its data set; pass --dataset")
    data = load_dataset(name, root=data_root, resize=image_size)
    if data.channels != channels or data.image_size != image_size:
        raise FedLatentError(f"data set {name!r} has {data.channels}x{data.image_size}px images, the distilled set "
                             f"{channels}x{image_size}px")
    if data.num_classes != len(meta["class_names"]):
        raise FedLatentError(f"data set {name!r} has {data.num_classes} classes, the distilled set "
                             f"{len(meta['class_names'])}")
    mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    if not (np.allclose(mean, data.mean) and np.allclose(std, data.std)):
        # Bring the test set into the distilled set's normalisation.
        from .data import denormalize, normalize

        data.x_test = normalize(denormalize(data.x_test, data.mean, data.std), mean, std)
        data.x_train = normalize(denormalize(data.x_train, data.mean, data.std), mean, std)
        data.mean, data.std = mean, std
    return data


def evaluate_distilled(distilled: Any, archs: Sequence[str] = ("convnet",), *, dataset: str | None = None,
                       data_root: str | os.PathLike | None = None, epochs: int = 300, lr: float = 0.01,
                       seeds: Sequence[int] = (0, 1, 2), batch_size: int = 256, dsa: bool = True,
                       max_test: int | None = None, progress: bool = True, data=None) -> dict[str, dict]:
    """Real test accuracy of fresh ``archs`` trained on a distilled set: ``{arch: {"mean", "std", "accs", ...}}``.

    ``distilled``: a path or a :class:`~fedlatent.export.DistilledDataset`. Unknown architectures, a data set
    that does not match the images, or an empty set raise FedLatentError.
    """
    from .distill.pixels import evaluate_synthetic
    from .models import get_model

    ds, meta = _load(distilled)
    if len(ds) == 0:
        raise FedLatentError("the distilled set is empty")
    if ds.labels is None:
        raise FedLatentError("the distilled set has no labels; it cannot train a classifier")
    if not seeds:
        raise FedLatentError("give at least one seed")
    c, s = int(ds.images.shape[1]), int(ds.images.shape[-1])
    for a in archs:  # fail before any training
        get_model(a, c, len(meta["class_names"]), s)
    if data is None:
        data = real_data_for(meta, s, c, dataset, data_root)
    out = {}
    for a in archs:
        r = evaluate_synthetic(ds.images, ds.labels, a, data, epochs=epochs, lr=lr, seeds=tuple(int(x) for x in seeds),
                               batch_size=batch_size, dsa=dsa, progress=progress, max_test=max_test)
        r["n_images"] = len(ds)
        out[a] = r
    return out


def real_subset(data, n_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` random real training images per class (the baseline of equal size), seeded."""
    from .distill.pixels import init_synthetic

    return init_synthetic(data, n_per_class, "real", seed)


def format_table(results: dict[str, dict]) -> str:
    """A small text table: architecture, mean +- std (percent), seeds."""
    lines = [f"{'arch':<12} {'accuracy':>16}  seeds"]
    for a, r in results.items():
        lines.append(f"{a:<12} {100 * r['mean']:>8.2f} +- {100 * r['std']:<5.2f}  {len(r['accs'])}")
    return "\n".join(lines)


__all__ = ["evaluate_distilled", "real_subset", "real_data_for", "format_table"]
