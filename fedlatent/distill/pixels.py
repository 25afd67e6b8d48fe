"""Pixel-space MTT: initialise a synthetic set, distil it against expert trajectories, evaluate it.

* :func:`init_synthetic` -- ``ipc`` images per class from random real samples (MTT's default) or
  Gaussian noise (DynaFed), with hard labels ``[0]*ipc + [1]*ipc + ...``.
* :func:`evaluate_synthetic` -- train fresh networks on the synthetic set only (DSA each batch, SGD
  momentum 0.9, weight decay 5e-4, lr divided by 10 after half the epochs, as the MTT reference's
  evaluation; lr = the learned lr) and report test accuracy mean +- std over seeds.
* :func:`distill_pixels` -- the whole pipeline used by ``fedlatent distill-pixels``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data import ImageData
from ..models import get_model
from ..synthetic import PixelSet
from ..utils import FedLatentError, derive_seed, numpy_rng, torch_generator
from .augment import DSA
from .distiller import DistillConfig, Distiller, TrajectorySampler
from .kernels import student_loss


def init_synthetic(data: ImageData, ipc: int, init: str = "real", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [C*ipc, ...], labels [C*ipc])`` ordered by class."""
    if ipc < 1:
        raise FedLatentError(f"ipc must be >= 1, got {ipc}")
    if init not in ("real", "noise"):
        raise FedLatentError(f"init must be 'real' or 'noise', got {init!r}")
    K = data.num_classes
    labels = torch.arange(K).repeat_interleave(ipc)
    if init == "noise":
        g = torch_generator(seed, "syn-init-noise")
        return torch.randn((K * ipc,) + tuple(data.x_train.shape[1:]), generator=g), labels
    rng = numpy_rng(seed, "syn-init-real")
    y = data.y_train.numpy()
    imgs = []
    for c in range(K):
        idx = np.flatnonzero(y == c)
        if len(idx) < ipc:
            raise FedLatentError(f"class {c} ({data.classes[c]}) has {len(idx)} training images, fewer than ipc={ipc}")
        imgs.append(data.x_train[torch.from_numpy(rng.choice(idx, ipc, replace=False))])
    return torch.cat(imgs).clone(), labels


def fit_on_set(model: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, opt: torch.optim.Optimizer, *,
               epochs: int, batch_size: int, augment: Callable[[torch.Tensor, int | None], torch.Tensor] | None,
               generator: torch.Generator, on_epoch: Callable[[int], None] | None = None) -> float:
    """Train ``model`` in place on a small (synthetic) set: ``epochs`` shuffled passes of ``opt`` over
    minibatches, optionally augmented (DSA), with :func:`~fedlatent.distill.kernels.student_loss`
    (hard int labels or soft-label logits).

    The one training loop behind evaluating a distilled set, DynaFed's server fine-tuning and FedDGM's
    server training on the pool. Shuffles and augmentation seeds come from ``generator``;
    ``on_epoch(ep)`` runs before each epoch (e.g. an lr decay). Returns the mean minibatch loss (nan
    when no step was taken).
    """
    n = int(x_all.shape[0])
    if epochs <= 0 or n == 0:
        return math.nan
    device = next(model.parameters()).device
    x_all, y_all = x_all.detach().to(device), y_all.detach().to(device)
    was_training = model.training
    model.train()
    total, steps = 0.0, 0
    for ep in range(epochs):
        if on_epoch is not None:
            on_epoch(ep)
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = x_all.index_select(0, idx)
            if augment is not None:
                x = augment(x, int(torch.randint(0, 2**62, (1,), generator=generator)))
            loss = student_loss(model(x), y_all.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    model.train(was_training)
    return total / steps if steps else math.nan


def train_on(images: torch.Tensor, labels: torch.Tensor, arch: str, data: ImageData, epochs: int, lr: float,
             seed: int, batch_size: int = 256, dsa: bool = True) -> torch.nn.Module:
    """Train a fresh ``arch`` on (images, labels) -- labels int or soft-label logits -- with SGD
    (momentum 0.9, weight decay 5e-4) and a 10x lr decay after half the epochs (reference evaluation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "eval-init"))
        net = get_model(arch, data.channels, data.num_classes, data.image_size)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_at = epochs // 2 + 1

    def decay(ep: int) -> None:
        if ep == decay_at:
            for gr in opt.param_groups:
                gr["lr"] *= 0.1

    fit_on_set(net, images, labels, opt, epochs=epochs, batch_size=batch_size,
               augment=DSA(siamese=False) if dsa else None, generator=torch_generator(seed, "eval-order"),
               on_epoch=decay)
    return net


@torch.no_grad()
def accuracy_on(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    net.eval()
    correct = sum(int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, arch: str, data: ImageData, epochs: int = 300,
                       lr: float = 0.01, seeds=(0, 1, 2), batch_size: int = 256, dsa: bool = True,
                       progress: bool = True, max_test: int | None = None) -> dict:
    """Test accuracy (fraction) of fresh ``arch`` networks trained on the synthetic set only."""
    from tqdm import tqdm

    if epochs < 1:
        raise FedLatentError(f"evaluation epochs must be >= 1, got {epochs}")
    if not np.isfinite(lr) or lr <= 0:
        raise FedLatentError(f"evaluation lr must be a positive number, got {lr}")
    xt, yt = data.x_test, data.y_test
    if max_test is not None:
        xt, yt = xt[:max_test], yt[:max_test]
    accs = []
    for s in tqdm(list(seeds), desc=f"evaluate {arch}", disable=not progress, leave=False):
        net = train_on(images, labels, arch, data, epochs, lr, seed=int(s), batch_size=batch_size, dsa=dsa)
        accs.append(accuracy_on(net, xt, yt))
    return {"arch": arch, "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
            "epochs": epochs, "lr": lr}


@dataclass
class PixelResult:
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    history: list[float]
    evaluation: dict | None = None
    initial_evaluation: dict | None = None
    extra: dict = field(default_factory=dict)


def distill_pixels(data: ImageData, trajectories: list[torch.Tensor], arch: str, ipc: int, iterations: int,
                   config: DistillConfig, init: str = "real", eval_epochs: int = 0, eval_seeds=(0,),
                   eval_init: bool = False, progress: bool = True, max_test: int | None = None) -> PixelResult:
    """Run pixel MTT and (``eval_epochs > 0``) evaluate the result (and optionally the initial set)."""
    images, labels = init_synthetic(data, ipc, init, config.seed)
    model = get_model(arch, data.channels, data.num_classes, data.image_size)
    n = sum(p.numel() for p in model.parameters())
    if trajectories[0].shape[-1] != n:
        raise FedLatentError(f"expert trajectories have {trajectories[0].shape[-1]} parameters but {arch} on "
                             f"{data.channels}x{data.image_size}px/{data.num_classes} classes has {n}")
    sampler = TrajectorySampler(trajectories, config.expert_epochs, config.max_start_epoch, seed=config.seed)
    initial = None
    if eval_epochs > 0 and eval_init:
        initial = evaluate_synthetic(images, labels, arch, data, eval_epochs, config.lr_teacher, eval_seeds,
                                     progress=progress, max_test=max_test)
    syn = PixelSet(images)
    dist = Distiller(model, syn, labels, sampler, config)
    dist.run(iterations, progress=progress)
    out = syn.images.detach().clone()
    ev = None
    if eval_epochs > 0:
        ev = evaluate_synthetic(out, labels, arch, data, eval_epochs, dist.lr, eval_seeds, progress=progress,
                                max_test=max_test)
    return PixelResult(out, labels, dist.lr, [h.loss for h in dist.history], ev, initial,
                       {"kernel": dist.kernel_name})


__all__ = ["init_synthetic", "evaluate_synthetic", "train_on", "accuracy_on", "distill_pixels", "PixelResult"]
