"""The in-memory data set (:class:`ImageData`), dataset descriptions and normalisation; no loading here, so
every loader (:mod:`fedlatent.data`, :mod:`fedlatent.data.hf`) builds on it without importing the others."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_name: str | None = None
    folder_names: tuple[str, ...] = ()
    note: str = ""


# Normalisation constants: the usual published per-channel statistics of each training set.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 32, 10, (0.3084,), (0.3977,), note="scikit-learn bundled, offline"),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), "MNIST", ("mnist", "MNIST")),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), "FashionMNIST", ("fashion-mnist", "fashion_mnist", "FashionMNIST")
    ),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10", ("cifar10", "cifar-10", "CIFAR10")
    ),
    "cifar100": DatasetInfo(
        "cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100", ("cifar100", "cifar-100", "CIFAR100")
    ),
}


@dataclass
class ImageData:
    """A dataset in memory: normalised float32 NCHW tensors and everything needed to undo it."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> model input space."""
        return normalize(x01, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space -> [0, 1] images (clamped)."""
        return denormalize(x, self.mean, self.std)


def normalize(x01: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def _to_tensor(x_u8_nhwc: np.ndarray, mean, std, resize: int | None) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(x_u8_nhwc)).permute(0, 3, 1, 2).float().div_(255.0)
    if resize is not None and resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return normalize(x, mean, std).contiguous()
