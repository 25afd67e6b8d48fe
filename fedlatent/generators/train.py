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
* optionally mode-seeking regularisation (Mao et al., "Mode Seeking GANs", CVPR 2019, eq. 3; ``ms_weight``):
  pairs of samples of the same class from different z must differ in proportion to their z distance
  (:func:`mode_seeking_loss`), against the intra-class collapse the auxiliary-classifier loss encourages;
* DiffAugment (Zhao et al. 2020: colour / translation / cutout applied identically-distributed to real and fake
  images before D, differentiably) against discriminator over-fitting on small public splits;
* an exponential moving average of the generator weights (``G_ema``, what is saved) and the per-class running
  mean of w (for truncation).
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData
from ..utils import FedLatentError, derive_seed, numpy_rng, sha256_file, torch_generator
from .builtin import BuiltinConfig, BuiltinStyleGenerator, save_builtin
from .discriminator import MinibatchStd, ProjectionDiscriminator, diff_augment
from .train_state import _load_opt, read_train_state, save_train_state, state_path_for


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
    d_channels_max: int = 128
    mbstd_group: int = 4  # minibatch-std group size in D (0: off)
    r1_gamma: float = 0.0  # R1 penalty weight (0: off), applied lazily every r1_every steps
    r1_every: int = 16
    ms_weight: float = 0.0  # mode-seeking regularisation weight (0: off; Mao et al. 2019)
    balanced: bool = True  # draw real images class-balanced (uniform class, then uniform image in it)
    seed: int = 0
    max_minutes: float | None = None
    save_every: int = 500

    #: options that may change when a run is resumed (they do not change the weights of the steps already done)
    RESUMABLE = ("steps", "max_minutes", "save_every")

    def check(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 2:
            raise FedLatentError(f"steps must be >= 1 and batch size >= 2 (got {self.steps}, {self.batch_size})")
        for p in filter(None, self.augment.split(",")):
            if p not in ("color", "translation", "cutout"):
                raise FedLatentError(f"unknown augmentation {p!r}; use color, translation, cutout")
        if self.mbstd_group < 0 or self.r1_gamma < 0 or self.r1_every < 1 or self.ms_weight < 0:
            raise FedLatentError("mbstd_group, r1_gamma and ms_weight must be >= 0 and r1_every >= 1")
        return self


@dataclass
class TrainResult:
    generator: BuiltinStyleGenerator  # the EMA generator (what is saved)
    steps_done: int
    seconds: float
    history: list
    curve: list = field(default_factory=list)


def _ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - beta)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


class _BalancedSampler:
    """Indices of real images: class-balanced (uniform class among those present, then uniform image in it) or
    uniform over the whole public split."""

    def __init__(self, y: torch.Tensor, balanced: bool):
        self.n, self.balanced = len(y), balanced
        order = torch.argsort(y.cpu(), stable=True)
        counts = torch.bincount(y.cpu())
        self.present = torch.nonzero(counts).flatten()
        self.order, self.counts = order, counts
        self.offsets = torch.cumsum(counts, 0) - counts

    def __call__(self, bs: int, g: torch.Generator) -> torch.Tensor:
        if not self.balanced:
            return torch.randint(0, self.n, (bs,), generator=g)
        cls = self.present[torch.randint(0, len(self.present), (bs,), generator=g)]
        within = (torch.rand(bs, generator=g, dtype=torch.float64) * self.counts[cls]).long()
        return self.order[self.offsets[cls] + within]


def train_generator(data: ImageData, public_idx: np.ndarray, gen_cfg: BuiltinConfig, cfg: TrainConfig,
                    out: str | os.PathLike | None = None, info: dict | None = None, progress: bool = True,
                    device: str | torch.device = "cpu", state_path: str | os.PathLike | None = None,
                    resume: str | os.PathLike | None = None, evaluate=None, eval_every_minutes: float | None = None,
                    curve_path: str | os.PathLike | None = None, on_step=None) -> TrainResult:
    """Train the built-in generator on ``data.x_train[public_idx]`` (see the module docstring for the objective).

    Every ``cfg.save_every`` steps and at the end, the EMA generator is exported to ``out`` (``info`` + training
    details in the metadata) and the full training state to ``state_path`` (default ``out`` with
    ``.train.safetensors``). ``resume``: a training state to continue from exactly (weights, optimiser moments,
    RNG streams, step, time); its configs win, except :attr:`TrainConfig.RESUMABLE` fields taken from ``cfg``.
    Stops early after ``cfg.max_minutes`` (of this invocation). ``evaluate(G_ema) -> dict`` is called every
    ``eval_every_minutes`` of training time (and at the end); records go to the returned ``curve`` and, one JSON
    per line, to ``curve_path``. Evaluation time is not counted as training time. ``on_step(step)`` is called
    after every step (tests use it to interrupt a run).
    """
    from tqdm.auto import tqdm

    saved = None
    if resume is not None:
        saved, tensors = read_train_state(resume)
        gen_cfg = BuiltinConfig.from_dict(saved["gen_config"])
        keep = {k: getattr(cfg, k) for k in TrainConfig.RESUMABLE}
        cfg = TrainConfig(**{**saved["train_config"], **keep})
        info = dict(info if info is not None else saved["info"])
        info["resumed_at_steps"] = list(saved["info"].get("resumed_at_steps", [])) + [saved["step"]]
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
    if gen_cfg.c_dim and int(y_pub.max()) >= gen_cfg.c_dim:
        raise FedLatentError(f"labels go up to {int(y_pub.max())} but the generator knows {gen_cfg.c_dim} classes")
    policy = tuple(p for p in cfg.augment.split(",") if p)

    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's global RNG
        torch.manual_seed(derive_seed(cfg.seed, "pretrain", "init"))
        G = BuiltinStyleGenerator(gen_cfg).to(device)
        D = ProjectionDiscriminator(gen_cfg.img_channels, gen_cfg.img_resolution, gen_cfg.c_dim,
                                    cfg.d_channels, cfg.d_channels_max, cfg.mbstd_group).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G.set_noise_mode("random")
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    rngs = {"data": torch_generator(cfg.seed, "pretrain", "batches"),
            "z": torch_generator(cfg.seed, "pretrain", "latents"),
            "aug": torch_generator(cfg.seed, "pretrain", "augment")}
    g_data, g_z, g_aug = rngs["data"], rngs["z"], rngs["aug"]
    sampler = _BalancedSampler(y_pub, cfg.balanced)
    present = sampler.present.to(device) if gen_cfg.c_dim else torch.zeros(1, dtype=torch.long)
    c_dim, bs = max(gen_cfg.c_dim, 1), cfg.batch_size
    history: list = []
    curve: list = []
    start, elapsed0, cpu0 = 0, 0.0, 0.0
    global_rng = None
    if saved is not None:
        for pre, mod in (("G", G), ("G_ema", G_ema), ("D", D)):
            sd = {k[len(pre) + 1:]: v for k, v in tensors.items() if k.startswith(pre + ".")}
            try:
                mod.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise FedLatentError(f"{resume}: training checkpoint does not match its config ({type(e).__name__})") from None
        _load_opt(opt_g, "opt_g", tensors)
        _load_opt(opt_d, "opt_d", tensors)
        for k, g in rngs.items():
            g.set_state(tensors[f"rng.{k}"])
        global_rng = tensors["rng.torch_global"]
        start, elapsed0 = saved["step"], saved["seconds"]
        cpu0 = saved["cpu_seconds"] if np.isfinite(saved["cpu_seconds"]) else float("nan")
        history, curve = list(saved["history"]), list(saved["curve"])
    meta = dict(info or {})
    meta["train_config"] = asdict(cfg)
    state_path = Path(state_path) if state_path is not None else (state_path_for(out) if out is not None else None)
    t_start, c_start = time.time(), time.process_time()
    eval_seconds, eval_cpu = [0.0], [0.0]

    def train_seconds() -> float:
        """Wall-clock training time over all sessions (evaluation excluded)."""
        return elapsed0 + time.time() - t_start - eval_seconds[0]

    def cpu_seconds() -> float:
        """CPU time of the training process over all sessions (evaluation excluded): on a shared machine this is
        the fairer measure of the work done."""
        return cpu0 + time.process_time() - c_start - eval_cpu[0]

    def save(step: int) -> None:
        secs = round(train_seconds(), 1)
        if out is not None:
            cpu = cpu_seconds()
            m = dict(meta, steps_done=step, train_seconds=secs, cpu_seconds=round(cpu, 1) if np.isfinite(cpu) else None,
                     history_tail=history[-4:], curve_tail=curve[-1:])
            save_builtin(G_ema, out, info=m)
        if state_path is not None:
            save_train_state(state_path, G=G, G_ema=G_ema, D=D, opt_g=opt_g, opt_d=opt_d, rngs=rngs, step=step,
                             seconds=train_seconds(), gen_cfg=gen_cfg, cfg=cfg, info=info or {}, history=history,
                             curve=curve, cpu_seconds=cpu_seconds())

    def run_eval(step: int) -> dict:
        t0, c0 = time.time(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            G_ema.set_noise_mode("const")
            metrics = evaluate(G_ema)
        eval_cpu[0] += time.process_time() - c0
        cpu = cpu_seconds()
        rec = {"step": step, "train_seconds": round(train_seconds(), 1),
               "cpu_seconds": round(cpu, 1) if np.isfinite(cpu) else None, **metrics}
        eval_seconds[0] += time.time() - t0
        rec["eval_seconds"] = round(time.time() - t0, 1)
        curve.append(rec)
        if curve_path is not None:
            with open(curve_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    last_eval = train_seconds() if (evaluate is not None and curve) else None
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    step = start
    postfix: dict = {}
    with torch.random.fork_rng(devices=[]):
        if global_rng is not None:
            torch.set_rng_state(global_rng)
        else:
            torch.manual_seed(derive_seed(cfg.seed, "pretrain", "global"))
        try:
            while step < cfg.steps:
                _train_step(step, G, G_ema, D, opt_g, opt_d, x_pub, y_pub, sampler, present, policy, gen_cfg, cfg,
                            g_data, g_z, g_aug, bs, history, postfix, train_seconds)
                step += 1
                bar.update(1)
                if step % 25 == 0 or step == cfg.steps:
                    bar.set_postfix(postfix, refresh=False)
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step)
                if evaluate is not None and eval_every_minutes and (
                        last_eval is None or train_seconds() - last_eval >= eval_every_minutes * 60):
                    rec = run_eval(step)
                    last_eval = rec["train_seconds"]
                    postfix.update({k: rec[k] for k in ("fidelity", "coverage", "fd") if k in rec})
                if on_step is not None:
                    on_step(step)
                if cfg.max_minutes is not None and time.time() - t_start > cfg.max_minutes * 60:
                    break
        except KeyboardInterrupt:
            bar.close()
            save(step)  # the state between two steps is consistent: resuming from it is exact
            raise
        bar.close()
        if evaluate is not None and (not curve or curve[-1]["step"] != step):
            run_eval(step)
        save(step)
    G_ema.set_noise_mode("const")
    return TrainResult(G_ema, step, train_seconds(), history, curve)


def mode_seeking_loss(x1: torch.Tensor, x2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                      eps: float = 1e-5) -> torch.Tensor:
    """Mode-seeking term (Mao et al., CVPR 2019, eq. 3, minimised as its reciprocal):
    ``1 / (mean|x1 - x2| / mean|z1 - z2| + eps)`` over pairs ``(x_i, z_i)`` of the same class."""
    ratio = (x1 - x2).abs().mean() / (z1 - z2).abs().mean()
    return 1.0 / (ratio + eps)


def _train_step(step, G, G_ema, D, opt_g, opt_d, x_pub, y_pub, sampler, present, policy, gen_cfg, cfg, g_data, g_z,
                g_aug, bs, history, postfix, train_seconds) -> None:
    """One discriminator update (plus a lazy R1 update every ``cfg.r1_every`` steps) and one generator update."""
    device = x_pub.device
    c_dim = max(gen_cfg.c_dim, 1)
    bi = sampler(bs, g_data).to(device)
    real, y = x_pub[bi], y_pub[bi]
    yf = present[torch.randint(0, len(present), (bs,), generator=g_z)].to(device)
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
    r1 = None
    if cfg.r1_gamma > 0 and step % cfg.r1_every == 0:
        # lazy R1 (Mescheder et al. 2018; StyleGAN2 sec. 3.1): gamma/2 E||grad_x D(x)||^2 on (augmented) reals,
        # weighted by the interval so the average strength does not depend on it
        xr = diff_augment(real, policy, g_aug).detach().requires_grad_(True)
        d_r, _ = D(xr, y)
        (grad,) = torch.autograd.grad(d_r.sum(), xr, create_graph=True)
        r1 = grad.square().sum(dim=(1, 2, 3)).mean()
        opt_d.zero_grad(set_to_none=True)
        (r1 * (cfg.r1_gamma / 2) * cfg.r1_every).backward()
        opt_d.step()
    # generator step (with the mode-seeking term, samples i and h + i share their class)
    z = torch.randn(bs, gen_cfg.z_dim, generator=g_z).to(device)
    h = bs // 2
    if cfg.ms_weight > 0:
        yf = torch.cat([yf[:h], yf[:h], yf[2 * h:]])
        onehot = F.one_hot(yf, c_dim).float() if gen_cfg.c_dim else None
    ws = G.mapping(z, onehot)
    fake = G.synthesis(ws)
    d_gen, cls_gen = D(diff_augment(fake, policy, g_aug), yf)
    loss_g = -d_gen.mean()
    if cfg.ms_weight > 0:
        loss_g = loss_g + cfg.ms_weight * mode_seeking_loss(fake[:h], fake[h:2 * h], z[:h], z[h:2 * h])
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
               "ac_fake": round(ac.item(), 4), "acc_fake": round(acc_fake, 3), "seconds": round(train_seconds(), 1)}
        if r1 is not None:
            rec["r1"] = round(r1.item(), 4)
        history.append(rec)
        history[:] = history[-400:]  # bounded: the state checkpoint carries it
        postfix.update(d=f"{rec['loss_d']:.3f}", g=f"{rec['loss_g']:.3f}", acc=f"{acc_fake:.2f}")


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
           "MinibatchStd", "diff_augment", "TrainConfig", "TrainResult", "train_generator", "manifest_entry",
           "save_train_state", "read_train_state", "state_path_for"]
