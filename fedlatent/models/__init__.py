"""Model registry.

``get_model(name, channels, num_classes, image_size)`` builds any registered architecture for
1- or 3-channel 28/32 px (or larger) inputs. Every model is a plain ``nn.Module`` whose
parameters can be flattened and driven functionally (:mod:`fedlatent.models.functional`), which
is what the trajectory-matching engine needs.

* ``convnet`` / ``convnet-d3|d4|d5``: the ConvNet of MTT/GLaD: depth x [conv3x3(width) ->
  instance norm (GroupNorm(width, width), affine) -> ReLU -> AvgPool 2x2] -> linear. ``convnet``
  picks the depth from the image size (3 up to 32 px, 4 at 64 px, 5 at 128 px).
* ``resnet18``, ``vgg11``, ``alexnet``: torchvision definitions adapted to small inputs. ``vgg11``
  up to 64 px has instance norm after every conv by default (the VGG-11 of the dataset-distillation
  literature's cross-architecture tables); ``vgg11:norm=batchnorm`` / ``vgg11:norm=none`` (plain
  VGG-11 "A", which rarely trains on a few hundred images).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..utils import FedLatentError


def _norm(kind: str, width: int, model: str) -> list[nn.Module]:
    """The normalisation layer after a ``width``-channel conv: instance norm (GroupNorm(width, width), affine),
    batch norm or none."""
    if kind == "instancenorm":
        return [nn.GroupNorm(width, width, affine=True)]
    if kind == "batchnorm":
        return [nn.BatchNorm2d(width)]
    if kind == "none":
        return []
    raise FedLatentError(f"unknown {model} norm {kind!r} (instancenorm, batchnorm, none)")


class ConvNet(nn.Module):
    """ConvNet-D{depth} (Gidaris & Komodakis; the student network of MTT and GLaD)."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", pooling: str = "avgpool"):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, kernel_size=3, padding=1), *_norm(norm, width, "ConvNet"), nn.ReLU()]
            if pooling == "avgpool":
                layers.append(nn.AvgPool2d(2, 2))
                s //= 2
            elif pooling == "maxpool":
                layers.append(nn.MaxPool2d(2, 2))
                s //= 2
            elif pooling != "none":
                raise FedLatentError(f"unknown ConvNet pooling {pooling!r}")
            c = width
        if s < 1:
            raise FedLatentError(f"image size {image_size} is too small for ConvNet depth {depth}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * s * s, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _convnet_depth(image_size: int) -> int:
    return 3 if image_size <= 32 else 4 if image_size <= 64 else 5


def _resnet18(channels: int, num_classes: int, image_size: int, **kw) -> nn.Module:
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=num_classes)
    if image_size <= 64:  # CIFAR-style stem: 3x3 conv, no max-pool
        m.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    else:
        m.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


class VGG11(nn.Module):
    """VGG-11 (configuration "A") for small inputs: [conv3x3 -> norm -> ReLU, max-pools] -> global pool -> linear.

    ``norm``: ``instancenorm`` (default; GroupNorm(C, C), affine - the VGG-11 that MTT and GLaD train on
    distilled sets), ``batchnorm`` or ``none`` (torchvision's plain VGG-11).

    The layer names (``features``, ``avgpool``, ``classifier``) and the initialisation follow
    torchvision's VGG; built directly so that torchvision's 120M-parameter 4096-wide head is never
    allocated only to be thrown away.
    """

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        # 28 px inputs are padded to 32 by the first conv so that the five 2x2 max-pools fit.
        pad = 1 + max(0, (32 - image_size) // 2)
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=pad), *_norm(norm, v, "VGG-11"), nn.ReLU(inplace=True)]
                c, pad = v, 1
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _vgg11(channels: int, num_classes: int, image_size: int, norm: str | None = None) -> nn.Module:
    if image_size <= 64:
        # Small inputs: keep the conv stack, pool to 1x1 and use a single linear head (as in
        # the dataset-distillation literature's VGG-11 for 32 px).
        return VGG11(channels, num_classes, image_size, norm=norm or "instancenorm")
    from torchvision.models import vgg11, vgg11_bn

    norm = norm or "none"  # torchvision's VGG-11 (its 4096-wide head) above 64 px
    if norm not in ("batchnorm", "none"):
        raise FedLatentError(f"vgg11 at {image_size} px is torchvision's: norm must be batchnorm or none, not {norm!r}")
    m = (vgg11_bn if norm == "batchnorm" else vgg11)(weights=None, num_classes=num_classes)
    m.features[0] = nn.Conv2d(channels, 64, kernel_size=3, padding=1)
    return m


class AlexNet(nn.Module):
    """AlexNet adapted to 28/32 px inputs (the variant used by the dataset-distillation literature)."""

    def __init__(self, channels: int, num_classes: int, image_size: int, **kw):
        super().__init__()
        pad = 4 if image_size == 28 else 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, kernel_size=5, stride=1, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),
        )
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda c, n, s, **kw: ConvNet(c, n, s, depth=kw.pop("depth", _convnet_depth(s)), **kw),
    "convnet-d3": lambda c, n, s, **kw: ConvNet(c, n, s, depth=3, **kw),
    "convnet-d4": lambda c, n, s, **kw: ConvNet(c, n, s, depth=4, **kw),
    "convnet-d5": lambda c, n, s, **kw: ConvNet(c, n, s, depth=5, **kw),
    "resnet18": _resnet18,
    "vgg11": _vgg11,
    "alexnet": lambda c, n, s, **kw: AlexNet(c, n, s),
}


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"convnet"`` or ``"convnet:width=32,depth=2"`` -> (name, kwargs)."""
    name, _, rest = spec.partition(":")
    kw: dict = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq:
            raise FedLatentError(f"model option {part!r} in {spec!r} is not key=value")
        kw[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return name.strip().lower(), kw


def get_model(name: str, channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """Build a registered model; ``name`` may carry options, e.g. ``convnet:width=32``."""
    base, kw = parse_model_spec(name)
    kw.update(kwargs)
    if base not in MODELS:
        raise FedLatentError(f"unknown architecture {base!r}; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[base](channels, num_classes, image_size, **kw)
    except TypeError as e:
        raise FedLatentError(f"bad options for architecture {base!r}: {e}") from None


__all__ = ["ConvNet", "AlexNet", "VGG11", "MODELS", "get_model", "parse_model_spec"]
