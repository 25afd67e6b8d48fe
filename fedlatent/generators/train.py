"""Training the built-in style generator on a public split (``fedlatent pretrain``).

Public split: :func:`public_split_indices` takes the first ``round(fraction * n)`` entries of a seeded permutation
of the training-set indices (``numpy_rng(seed, "public-split")``); those images are "public" (server-side,
used only to train the generator) and the federated code excludes them from every client
(:func:`private_split_indices` is the complement). The seed and fraction are stored in the checkpoint metadata
and the manifest entry, so the federated side can rebuild exactly the same split.

Objective: a class-conditional GAN that a CPU can train in minutes —

* hinge loss (Lim & Ye 2017; Miyato et al. 2018): ``L_D = E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y), y))]``,
  ``L_G = -E[D(G(z, y), y)]``;
* projection discriminator (Miyato & Koyama 2018): ``D(x, y) = psi(h(x)) + <embed(y), h(x)>``, spectral
  normalisation on every layer;
* an auxiliary classifier head on ``h(x)`` (AC-GAN, Odena et al. 2017), trained on real images only and used as
  an extra generator loss ``ac_weight * CE(cls(G(z, y)), y)``: it makes samples class-recognisable after few
  steps, which is what distillation through the generator needs;
* DiffAugment (Zhao et al. 2020: colour / translation / cutout applied identically-distributed to real and fake
  images before D, differentiably) against discriminator over-fitting on small public splits;
* an exponential moving average of the generator weights (``G_ema``, what is saved) and the per-class running
  mean of w (for truncation).
"""
from __future__ import annotations

import copy
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..data import ImageData
from ..utils import FedLatentError, derive_seed, numpy_rng, sha256_file, torch_generator
from .builtin import BuiltinConfig, BuiltinStyleGenerator, save_builtin


# --- public split --------------------------------------------------------------------------------------------
def public_split_indices(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of the public part of a training set of size ``n``.

    The first ``round(fraction * n)`` entries of the permutation ``numpy_rng(seed, "public-split").permutation(n)``;
    ``fraction`` in (0, 1]. The same (n, fraction, seed) always gives the same indices.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise FedLatentError(f"public split: dataset size must be a positive integer, got {n!r}")
    if not (0.0 < float(fraction) <= 1.0):
        raise FedLatentError(f"public split fraction must be in (0, 1], got {fraction}")
    m = max(1, int(round(float(fraction) * n)))
    perm = numpy_rng(int(seed), "public-split").permutation(int(n))
    return np.sort(perm[:m]).astype(np.int64)


def private_split_indices(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted complement of :func:`public_split_indices` (what the federated clients may use)."""
    mask = np.ones(int(n), dtype=bool)
    mask[public_split_indices(n, fraction, seed)] = False
    return np.flatnonzero(mask).astype(np.int64)


def parse_public_split(spec: str | float, n: int) -> tuple[float, int]:
    """``"0.1"`` (fraction), ``"6000"`` (count), optionally ``":seed=N"`` -> (fraction, seed)."""
    s = str(spec).strip()
    m = re.fullmatch(r"([0-9.eE+-]+)(?::seed=(-?\d+))?", s)
    if not m:
        raise FedLatentError(f"bad --public-split {spec!r}; use a fraction (0.1), a count (6000), optionally ':seed=N'")
    try:
        v = float(m.group(1))
    except ValueError:
        raise FedLatentError(f"bad --public-split {spec!r}: {m.group(1)!r} is not a number") from None
    seed = int(m.group(2)) if m.group(2) is not None else 0
    if v > 1:
        if v != int(v) or v > n:
            raise FedLatentError(f"--public-split count {spec!r} must be an integer <= {n}")
        v = v / n
    if v <= 0:
        raise FedLatentError(f"--public-split must be positive, got {spec!r}")
    return v, seed


# --- discriminator -------------------------------------------------------------------------------------------
class ProjectionDiscriminator(nn.Module):
    """Spectral-normalised conv discriminator with a projection head and an auxiliary classifier head."""

    def __init__(self, img_channels: int, resolution: int, c_dim: int, base_channels: int = 32,
                 max_channels: int = 128):
        super().__init__()
        final = 7 if resolution % 7 == 0 else 4
        ch = base_channels
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(img_channels, ch, 3, padding=1)), nn.LeakyReLU(0.2),
                                   spectral_norm(nn.Conv2d(ch, ch, 3, padding=1)), nn.LeakyReLU(0.2)]
        res = resolution
        while res > final:  # downsample first, then widen: keeps the cost of the full-resolution convs low
            out = min(max_channels, ch * 2)
            layers += [nn.AvgPool2d(2), spectral_norm(nn.Conv2d(ch, out, 3, padding=1)), nn.LeakyReLU(0.2),
                       spectral_norm(nn.Conv2d(out, out, 3, padding=1)), nn.LeakyReLU(0.2)]
            ch, res = out, res // 2
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


# --- training ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr_g: float = 2e-3
    lr_d: float = 2e-3
    beta1: float = 0.0
    beta2: float = 0.99
    ac_weight: float = 1.0
    augment: str = "translation,cutout"
    ema_beta: float = 0.999
    d_channels: int = 32
    seed: int = 0
    max_minutes: float | None = None
    save_every: int = 500

    def check(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 2:
            raise FedLatentError(f"steps must be >= 1 and batch size >= 2 (got {self.steps}, {self.batch_size})")
        for p in filter(None, self.augment.split(",")):
            if p not in ("color", "translation", "cutout"):
                raise FedLatentError(f"unknown augmentation {p!r}; use color, translation, cutout")
        return self


@dataclass
class TrainResult:
    generator: BuiltinStyleGenerator  # the EMA generator (what is saved)
    steps_done: int
    seconds: float
    history: list


def _ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - beta)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def train_generator(data: ImageData, public_idx: np.ndarray, gen_cfg: BuiltinConfig, cfg: TrainConfig,
                    out: str | os.PathLike | None = None, info: dict | None = None, progress: bool = True,
                    device: str | torch.device = "cpu") -> TrainResult:
    """Train the built-in generator on ``data.x_train[public_idx]`` (see the module docstring for the objective).

    If ``out`` is given, the EMA generator is saved there every ``cfg.save_every`` steps and at the end
    (``info`` + training details in the metadata). Stops early after ``cfg.max_minutes``.
    """
    from tqdm.auto import tqdm

    cfg.check()
    gen_cfg.check()
    device = torch.device(device)
    idx = torch.as_tensor(np.asarray(public_idx), dtype=torch.long)
    if len(idx) < 2:
        raise FedLatentError("public split holds fewer than 2 images")
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x_pub = ((data.x_train[idx] * std + mean).clamp(0, 1) * 2 - 1).to(device)  # [-1, 1]
    y_pub = data.y_train[idx].to(device)
    if x_pub.shape[1] != gen_cfg.img_channels or x_pub.shape[-1] != gen_cfg.img_resolution:
        raise FedLatentError(f"data is {x_pub.shape[1]}x{x_pub.shape[-1]}px but the generator makes "
                             f"{gen_cfg.img_channels}x{gen_cfg.img_resolution}px")
    policy = tuple(p for p in cfg.augment.split(",") if p)

    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's global RNG
        torch.manual_seed(derive_seed(cfg.seed, "pretrain", "init"))
        G = BuiltinStyleGenerator(gen_cfg).to(device)
        D = ProjectionDiscriminator(gen_cfg.img_channels, gen_cfg.img_resolution, gen_cfg.c_dim,
                                    cfg.d_channels).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G.set_noise_mode("random")
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    g_data = torch_generator(cfg.seed, "pretrain", "batches")
    g_z = torch_generator(cfg.seed, "pretrain", "latents")
    g_aug = torch_generator(cfg.seed, "pretrain", "augment")
    n, c_dim, bs = len(x_pub), max(gen_cfg.c_dim, 1), cfg.batch_size
    history: list = []
    t0 = time.time()
    meta = dict(info or {})
    meta["train_config"] = asdict(cfg)

    def save(step: int) -> None:
        if out is not None:
            m = dict(meta, steps_done=step, train_seconds=round(time.time() - t0, 1))
            save_builtin(G_ema, out, info=m)

    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    step = 0
    for step in bar:
        # discriminator step
        bi = torch.randint(0, n, (bs,), generator=g_data).to(device)
        real, y = x_pub[bi], y_pub[bi]
        yf = torch.randint(0, c_dim, (bs,), generator=g_z).to(device)
        z = torch.randn(bs, gen_cfg.z_dim, generator=g_z).to(device)
        onehot = F.one_hot(yf, c_dim).float() if gen_cfg.c_dim else None
        with torch.no_grad():
            fake = G(z, onehot)
        d_real, cls_real = D(diff_augment(real, policy, g_aug), y)
        d_fake, _ = D(diff_augment(fake, policy, g_aug), yf)
        loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        if gen_cfg.c_dim and cfg.ac_weight > 0:
            loss_d = loss_d + cfg.ac_weight * F.cross_entropy(cls_real, y)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator step
        z = torch.randn(bs, gen_cfg.z_dim, generator=g_z).to(device)
        ws = G.mapping(z, onehot)
        fake = G.synthesis(ws)
        d_gen, cls_gen = D(diff_augment(fake, policy, g_aug), yf)
        loss_g = -d_gen.mean()
        ac = torch.zeros(())
        if gen_cfg.c_dim and cfg.ac_weight > 0:
            ac = F.cross_entropy(cls_gen, yf)
            loss_g = loss_g + cfg.ac_weight * ac
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        G.mapping.update_w_avg(ws.detach(), onehot)
        _ema_update(G_ema, G, min(cfg.ema_beta, (1 + step) / (10 + step)))
        if not all(torch.isfinite(t) for t in (loss_d, loss_g)):
            raise FedLatentError(f"GAN training diverged at step {step} (loss is NaN/inf); lower the learning rates")
        if step % 25 == 0 or step == cfg.steps - 1:
            acc_fake = (cls_gen.argmax(1) == yf).float().mean().item() if gen_cfg.c_dim else float("nan")
            rec = {"step": step, "loss_d": round(loss_d.item(), 4), "loss_g": round(loss_g.item(), 4),
                   "ac_fake": round(ac.item(), 4), "acc_fake": round(acc_fake, 3), "seconds": round(time.time() - t0, 1)}
            history.append(rec)
            bar.set_postfix(d=f"{rec['loss_d']:.3f}", g=f"{rec['loss_g']:.3f}", acc=f"{acc_fake:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
        if cfg.max_minutes is not None and time.time() - t0 > cfg.max_minutes * 60:
            break
    bar.close()
    steps_done = step + 1
    meta["history_tail"] = history[-4:]
    save(steps_done)
    G_ema.set_noise_mode("const")
    return TrainResult(G_ema, steps_done, time.time() - t0, history)


def manifest_entry(path: str | os.PathLike, manifest_dir: str | os.PathLike, gen: BuiltinStyleGenerator,
                   dataset: str, public: dict, command: str, steps_done: int, seconds: float) -> dict:
    """The manifest record of a built-in checkpoint (file relative to the manifest folder when inside it)."""
    path, manifest_dir = Path(path).resolve(), Path(manifest_dir).resolve()
    try:
        rel = str(path.relative_to(manifest_dir))
    except ValueError:
        rel = str(path)
    cfg = gen.cfg
    return {
        "kind": "builtin",
        "file": rel,
        "dataset": dataset,
        "resolution": cfg.img_resolution,
        "channels": cfg.img_channels,
        "classes": cfg.c_dim,
        "class_names": list(cfg.classes),
        "num_layers": len(gen.synthesis.layer_names),
        "num_ws": gen.num_ws,
        "parameters": gen.num_parameters(),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "public_split": public,
        "steps": steps_done,
        "train_seconds": round(seconds, 1),
        "command": command,
    }


__all__ = ["public_split_indices", "private_split_indices", "parse_public_split", "ProjectionDiscriminator",
           "diff_augment", "TrainConfig", "TrainResult", "train_generator", "manifest_entry"]
