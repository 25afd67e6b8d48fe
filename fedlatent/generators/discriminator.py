"""Discriminator side of the built-in generator's GAN training: the projection discriminator with an auxiliary
class head and minibatch standard deviation, and DiffAugment-style differentiable augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..utils import FedLatentError


def _start_size(resolution: int) -> int:
    from .builtin import layout  # noqa: PLC0415 (the generator's layout decides D's start size)

    return layout(resolution)[0]

# --- discriminator -------------------------------------------------------------------------------------------
class MinibatchStd(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, ProGAN sec. 3): one extra feature map holding the mean,
    over features and positions, of the standard deviation across a group of ``group`` samples.

    Samples ``n`` and ``n + N / group`` share a group. A discriminator that sees this statistic can tell a batch
    of near-identical fakes from a diverse real batch, which pushes the generator away from mode collapse.
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = int(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group, n)
        while n % g:
            g -= 1
        y = x.reshape(g, n // g, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # [N/g, C, H, W]: std across the group
        y = y.mean(dim=(1, 2, 3)).reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y], dim=1)


class ProjectionDiscriminator(nn.Module):
    """Spectral-normalised conv discriminator with a projection head and an auxiliary classifier head.

    ``mbstd_group > 0`` adds a :class:`MinibatchStd` feature map and one more conv before the heads.
    """

    def __init__(self, img_channels: int, resolution: int, c_dim: int, base_channels: int = 32,
                 max_channels: int = 128, mbstd_group: int = 0):
        super().__init__()
        final = _start_size(resolution)
        ch = base_channels
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(img_channels, ch, 3, padding=1)), nn.LeakyReLU(0.2),
                                   spectral_norm(nn.Conv2d(ch, ch, 3, padding=1)), nn.LeakyReLU(0.2)]
        res = resolution
        while res > final:  # downsample first, then widen: keeps the cost of the full-resolution convs low
            out = min(max_channels, ch * 2)
            layers += [nn.AvgPool2d(2), spectral_norm(nn.Conv2d(ch, out, 3, padding=1)), nn.LeakyReLU(0.2),
                       spectral_norm(nn.Conv2d(out, out, 3, padding=1)), nn.LeakyReLU(0.2)]
            ch, res = out, res // 2
        if mbstd_group > 0:
            layers += [MinibatchStd(mbstd_group), spectral_norm(nn.Conv2d(ch + 1, ch, 3, padding=1)),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.psi = spectral_norm(nn.Linear(ch, 1))
        self.embed = spectral_norm(nn.Embedding(max(c_dim, 1), ch))
        self.cls = nn.Linear(ch, max(c_dim, 1))
        self.c_dim = c_dim

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).sum(dim=(2, 3))
        out = self.psi(h).squeeze(1)
        if self.c_dim > 0:
            out = out + (self.embed(y) * h).sum(1)
        return out, self.cls(h)


# --- DiffAugment-style differentiable augmentation -----------------------------------------------------------
def diff_augment(x: torch.Tensor, policy: tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    """Random colour / translation / cutout, differentiable in ``x`` (images in [-1, 1])."""
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev, dt)

    for p in policy:
        if p == "color":
            x = x + (rand(n, 1, 1, 1) - 0.5)
            if c > 1:
                m = x.mean(dim=1, keepdim=True)
                x = (x - m) * (rand(n, 1, 1, 1) * 2) + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (rand(n, 1, 1, 1) + 0.5) + m
        elif p == "translation":
            sh, sw = max(1, int(h * 0.125 + 0.5)), max(1, int(w * 0.125 + 0.5))
            ty = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g).to(dev)
            tx = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g).to(dev)
            rows = (torch.arange(h, device=dev).view(1, h, 1) + ty + sh)
            cols = (torch.arange(w, device=dev).view(1, 1, w) + tx + sw)
            xp = F.pad(x, (sw, sw, sh, sh))
            bidx = torch.arange(n, device=dev).view(n, 1, 1)
            x = xp.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)
        elif p == "cutout":
            ch_, cw_ = max(1, int(h * 0.5 + 0.5)), max(1, int(w * 0.5 + 0.5))
            cy = torch.randint(0, h + (1 - ch_ % 2), (n, 1, 1), generator=g).to(dev)
            cx = torch.randint(0, w + (1 - cw_ % 2), (n, 1, 1), generator=g).to(dev)
            yy = torch.arange(h, device=dev).view(1, h, 1) - (cy - ch_ // 2)
            xx = torch.arange(w, device=dev).view(1, 1, w) - (cx - cw_ // 2)
            inside = (yy >= 0) & (yy < ch_) & (xx >= 0) & (xx < cw_)
            x = x * (~inside).unsqueeze(1).to(dt)
        elif p:
            raise FedLatentError(f"unknown augmentation {p!r}; use color, translation, cutout")
    return x
