"""Differentiable Siamese Augmentation (DSA) and ZCA whitening for dataset distillation.

DSA (Zhao & Bilen, ICML 2021; used by MTT, Cazenavette et al. 2022) augments the synthetic images
with transformations that are differentiable w.r.t. the pixels, so gradients reach the images
through the augmentation. The default strategy ``color_crop_cutout_flip_scale_rotate`` picks ONE
of the six groups uniformly per call ("single" mode, as in the MTT reference) and applies it:

* ``color``:  brightness ``x + (r - 0.5) * 1.0``, saturation ``(x - mean_c) * 2r + mean_c``,
  contrast ``(x - mean_chw) * (r + 0.5) + mean_chw`` (three independent draws r ~ U[0, 1));
* ``crop``:   integer translation by up to ``round(0.125 * size)`` pixels, zero fill;
* ``cutout``: a zeroed square of half the image side at a random centre;
* ``flip``:   horizontal flip with probability 0.5;
* ``scale``:  x/y scaling by factors in [1/1.2, 1.2] (bilinear resampling, zero padding);
* ``rotate``: rotation by an angle in [-15, 15] degrees (bilinear, zero padding).

Every random number comes from an explicit :class:`torch.Generator`, so one seed fixes the
transformation and a step can be *replayed* exactly (the constant-memory MTT backward recomputes
each student step). "Siamese" (default): one set of parameters for the whole batch; with
``siamese=False`` every image gets its own draw (what the MTT reference does during distillation).
All transformations are linear in the pixels given their parameters (brightness is affine), so the
augmented batch is differentiable w.r.t. the input images.

ZCA whitening (:class:`ZCA`) wraps :class:`kornia.enhance.ZCAWhitening` (eps 0.1 as in the MTT
reference), fitted on the real training images and applied to real and synthetic images alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..utils import FedLatentError, atomic_write

GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the DSA transformations (defaults of the DSA/MTT reference)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass
class AugDraw:
    """The random parameters of one augmentation call (tensors of length 1 when siamese, else B)."""

    groups: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)


def parse_strategy(strategy: str) -> tuple[str, ...]:
    parts = tuple(p for p in strategy.lower().split("_") if p)
    if strategy.lower() in ("", "none"):
        return ()
    bad = [p for p in parts if p not in GROUPS]
    if bad:
        raise FedLatentError(f"unknown DSA transformation(s) {bad} in strategy {strategy!r}; choose from {', '.join(GROUPS)}")
    return parts


class DSA:
    """Differentiable Siamese Augmentation with replayable random parameters.

    ``dsa(x, seed)`` draws the parameters from ``torch.Generator().manual_seed(seed)`` and applies
    them; the same seed always gives the same transformation. ``mode='single'`` (default, as the
    MTT reference) applies one randomly chosen group per call, ``mode='all'`` applies every group in
    order.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams | None = None, siamese: bool = True,
                 mode: str = "single"):
        if mode not in ("single", "all"):
            raise FedLatentError(f"DSA mode must be 'single' or 'all', got {mode!r}")
        self.groups = parse_strategy(strategy)
        self.strategy = strategy
        self.params = params or DSAParams()
        self.siamese = siamese
        self.mode = mode

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r}, siamese={self.siamese}, mode={self.mode!r})"

    # -- drawing ---------------------------------------------------------------------------------
    def draw(self, batch: int, height: int, width: int, generator: torch.Generator) -> AugDraw:
        """Draw the random parameters of one call (always on CPU, float64 for exact replay)."""
        if not self.groups:
            return AugDraw(())
        p, g = self.params, generator
        n = 1 if self.siamese else batch
        if self.mode == "single":
            k = int(torch.randint(len(self.groups), (1,), generator=g))
            groups: tuple[str, ...] = (self.groups[k],)
        else:
            groups = self.groups
        vals: dict[str, torch.Tensor] = {}

        def u(lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
            return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo

        for grp in groups:
            if grp == "color":
                vals["brightness"] = (u() - 0.5) * p.brightness
                vals["saturation"] = u() * p.saturation
                vals["contrast"] = u() + p.contrast
            elif grp == "crop":
                sh, sw = int(height * p.ratio_crop_pad + 0.5), int(width * p.ratio_crop_pad + 0.5)
                vals["shift_h"] = torch.randint(-sh, sh + 1, (n,), generator=g)
                vals["shift_w"] = torch.randint(-sw, sw + 1, (n,), generator=g)
            elif grp == "cutout":
                ch, cw = int(height * p.ratio_cutout + 0.5), int(width * p.ratio_cutout + 0.5)
                vals["cut_h"] = torch.randint(0, height + (1 - ch % 2), (n,), generator=g)
                vals["cut_w"] = torch.randint(0, width + (1 - cw % 2), (n,), generator=g)
            elif grp == "flip":
                vals["flip"] = u() < p.prob_flip
            elif grp == "scale":
                vals["scale_x"] = u(1.0 / p.ratio_scale, p.ratio_scale)
                vals["scale_y"] = u(1.0 / p.ratio_scale, p.ratio_scale)
            elif grp == "rotate":
                vals["angle"] = (u() - 0.5) * 2.0 * p.ratio_rotate / 180.0 * math.pi
        return AugDraw(groups, vals)

    # -- applying --------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, draw: AugDraw) -> torch.Tensor:
        """Apply drawn parameters to ``x`` ([B, C, H, W]); differentiable w.r.t. ``x``.

        Dispatches through :func:`fedlatent.ops.dsa_augment` (fused CUDA kernel for CUDA tensors, else
        :meth:`apply_reference`)."""
        return ops.dsa_augment(x, draw, self)

    def apply_reference(self, x: torch.Tensor, draw: AugDraw) -> torch.Tensor:
        """The PyTorch reference of :meth:`apply`: every drawn group in turn."""
        return self.apply_groups(x, draw, draw.groups)

    def apply_groups(self, x: torch.Tensor, draw: AugDraw, groups: tuple[str, ...]) -> torch.Tensor:
        """Apply the PyTorch reference of the given groups of ``draw``, in order."""
        for grp in groups:
            x = _APPLY[grp](self, x, draw.values)
        return x

    def __call__(self, x: torch.Tensor, seed: int | None) -> torch.Tensor:
        if seed is None or not self.groups:
            return x
        gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], gen))


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A length-1 or length-B parameter as a [n, 1, 1, 1] tensor on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    x = x + _col(v["brightness"], x)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * _col(v["saturation"], x) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * _col(v["contrast"], x) + m


def _crop(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    """Translate by (shift_h, shift_w) pixels with zero fill: out[i, j] = x[i + sh, j + sw]."""
    B, C, H, W = x.shape
    sh, sw = v["shift_h"], v["shift_w"]
    ph, pw = int(sh.abs().max()), int(sw.abs().max())
    xp = F.pad(x, (pw, pw, ph, ph))
    if sh.numel() == 1:
        a, b = ph + int(sh[0]), pw + int(sw[0])
        return xp[:, :, a : a + H, b : b + W]
    rows = (torch.arange(H).view(1, H) + ph + sh.view(-1, 1)).to(x.device)  # [B, H]
    cols = (torch.arange(W).view(1, W) + pw + sw.view(-1, 1)).to(x.device)  # [B, W]
    bidx = torch.arange(B, device=x.device).view(B, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(B, H, 1), cols.view(B, 1, W)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def _cutout(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    B, C, H, W = x.shape
    ch, cw = int(H * self.params.ratio_cutout + 0.5), int(W * self.params.ratio_cutout + 0.5)
    top = (v["cut_h"] - ch // 2).view(-1, 1, 1).to(x.device)
    left = (v["cut_w"] - cw // 2).view(-1, 1, 1).to(x.device)
    i = torch.arange(H, device=x.device).view(1, H, 1)
    j = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (i >= top) & (i < top + ch) & (j >= left) & (j < left + cw)
    return x * (~inside).to(x.dtype).unsqueeze(1)


def _flip(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    f = v["flip"]
    if f.numel() == 1:
        return x.flip(3) if bool(f[0]) else x
    return torch.where(f.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    sx, sy = v["scale_x"], v["scale_y"]
    z = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, z, z], -1), torch.stack([z, sy, z], -1)], 1)
    return _affine(x, theta)


def _rotate(self: DSA, x: torch.Tensor, v: dict) -> torch.Tensor:
    a = v["angle"]
    c, s, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1)], 1)
    return _affine(x, theta)


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def no_augment(x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The identity augmentation (same call signature as :class:`DSA`)."""
    return x


# ------------------------------------------------------------------------------------------------
# ZCA whitening
# ------------------------------------------------------------------------------------------------
class ZCA:
    """ZCA whitening fitted on real images (kornia's ZCAWhitening, eps 0.1 as the MTT reference).

    ``zca(x)`` whitens ``[N, C, H, W]`` images, ``zca.inverse(x)`` undoes it (for viewing).
    The fit is saved/loaded with safetensors.
    """

    def __init__(self, eps: float = 0.1):
        from kornia.enhance import ZCAWhitening

        self.eps = float(eps)
        self._zca = ZCAWhitening(eps=self.eps, compute_inv=True)
        self.shape: tuple[int, ...] | None = None

    @property
    def fitted(self) -> bool:
        return bool(self._zca.fitted)

    def fit(self, images: torch.Tensor, max_images: int | None = None) -> "ZCA":
        if images.ndim != 4 or images.shape[0] < 2:
            raise FedLatentError(f"ZCA needs at least two images [N, C, H, W], got shape {tuple(images.shape)}")
        x = images if max_images is None else images[:max_images]
        self.shape = tuple(x.shape[1:])
        self._zca.fit(x.reshape(x.shape[0], -1).double())
        return self

    def _check(self, x: torch.Tensor) -> None:
        if not self.fitted:
            raise FedLatentError("ZCA is not fitted: call fit() on the real training images first")
        if tuple(x.shape[1:]) != self.shape:
            raise FedLatentError(f"ZCA was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        flat = x.reshape(x.shape[0], -1)
        out = self._zca(flat.to(self._zca.transform_matrix.dtype))
        return out.to(x.dtype).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        flat = x.reshape(x.shape[0], -1)
        out = self._zca.inverse_transform(flat.to(self._zca.transform_matrix.dtype))
        return out.to(x.dtype).reshape(x.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise FedLatentError("ZCA is not fitted")
        z = self._zca
        return {"mean_vector": z.mean_vector.contiguous(), "transform_matrix": z.transform_matrix.contiguous(),
                "transform_inv": z.transform_inv.contiguous(), "shape": torch.tensor(self.shape),
                "eps": torch.tensor(self.eps, dtype=torch.float64)}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        sd = self.state_dict()
        atomic_write(path, lambda p: save_file(sd, p))

    @classmethod
    def load(cls, path: str | Path) -> "ZCA":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a bad file
            raise FedLatentError(f"{path}: not a readable ZCA safetensors file ({e})") from None
        missing = {"mean_vector", "transform_matrix", "transform_inv", "shape", "eps"} - set(sd)
        if missing:
            raise FedLatentError(f"{path}: not a ZCA file (missing {sorted(missing)})")
        z = cls(eps=float(sd["eps"]))
        z._zca.mean_vector = sd["mean_vector"]
        z._zca.transform_matrix = sd["transform_matrix"]
        z._zca.transform_inv = sd["transform_inv"]
        z._zca.fitted = True
        z.shape = tuple(int(s) for s in sd["shape"])
        return z


__all__ = ["DSA", "DSAParams", "AugDraw", "ZCA", "no_augment", "parse_strategy", "GROUPS", "DEFAULT_STRATEGY"]
