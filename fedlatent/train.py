"""The one supervised minibatch loop (:func:`fit`) and central evaluation (:func:`evaluate`).

Every "train a model on tensors" need runs :func:`fit`: clients' local SGD (:func:`fedlatent.fl.client.local_train`,
FedProx's proximal term through ``loss_fn``), expert trajectories (:func:`fedlatent.distill.experts.train_experts`),
FedMD's digest, FedDF's server distillation (a step budget and early stopping through ``on_step``), training on a
synthetic set (:func:`fit_on_set`: FedDGM's server training on the pool, DynaFed's fine-tuning, the evaluation of
a distilled set). What differs between them - the loss, the optimiser, how augmentation is seeded, what is
logged, when to stop - comes in as arguments; the order of operations per minibatch is always: seeded
permutation per epoch, gather, augment, forward, loss, ``zero_grad``, backward, step.

The loops that are *not* this one, on purpose: the MTT student steps (:mod:`fedlatent.distill.mtt`: a
differentiable functional update with a learnable step size, whose meta-gradient goes through every step) and
the generator training of :mod:`fedlatent.generators.train` (two alternating adversarial objectives).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FedLatentError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]

LR_SCHEDULES = ("constant", "step", "cosine")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The base lr's multiplier in epoch ``epoch`` (0-based) of ``epochs``.

    * ``constant``: 1 (FedDG-main's server training, ``SGD(lr=args.lr_net)`` for every epoch);
    * ``step``: 1, then 0.1 from epoch ``epochs // 2 + 1`` on (the one 10x decay of MTT's evaluation of a
      distilled set, ``lr_schedule = [Epoch // 2 + 1]`` in mtt-distillation's utils.py);
    * ``cosine``: ``(1 + cos(pi * epoch / epochs)) / 2`` (Loshchilov & Hutter, ICLR 2017, without restarts),
      from 1 at epoch 0 towards 0 at ``epochs``.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 if epoch >= epochs // 2 + 1 else 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise FedLatentError(f"lr schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {schedule!r}")


def schedule_lr(opt: torch.optim.Optimizer, schedule: str, epochs: int) -> Callable[[int], None] | None:
    """An ``on_epoch`` hook for :func:`fit` that sets every parameter group's lr to its lr at the time of this
    call times :func:`lr_factor` before each epoch; None for ``constant`` (the optimiser is left alone)."""
    lr_factor(schedule, 0, epochs)  # validates the name
    if schedule == "constant":
        return None
    base = [g["lr"] for g in opt.param_groups]

    def hook(epoch: int) -> None:
        f = lr_factor(schedule, epoch, epochs)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f

    return hook


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, *, epochs: int | Iterable[int],
        batch_size: int, generator: torch.Generator | None, loss_fn: LossFn | None = None,
        augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        augment_seed: Callable[[int, int], int] | None = None, on_epoch: Callable[[int], None] | None = None,
        on_step: Callable[[torch.Tensor, int], bool | None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None) -> int:
    """Minibatch training of ``model`` in place on ``(x, y)``; returns the number of optimiser steps.

    Per epoch (``epochs``: a count, or any iterable of epoch indices, e.g. a progress bar) the batch order is
    ``torch.randperm(n, generator)``; the last batch may be smaller. ``loss_fn(model, xb, yb)`` returns the
    objective, or ``(objective, reported)`` (default: cross-entropy); ``augment(xb, seed)`` gets the seed
    ``augment_seed(epoch, batch)`` or, without it, the next draw of ``generator``. ``on_step(reported, batch
    size)`` runs after every step (a true return value stops training); ``on_epoch(ep)`` before and
    ``on_epoch_end(ep)`` after every epoch. The model's train/eval mode is the caller's.
    """
    loss_fn = loss_fn or _cross_entropy
    n = int(x.shape[0])
    steps = 0
    for ep in (range(epochs) if isinstance(epochs, int) else epochs):
        if on_epoch is not None:
            on_epoch(ep)
        order = torch.randperm(n, generator=generator).to(x.device)
        for b, i in enumerate(range(0, n, batch_size)):
            idx = order[i : i + batch_size]
            xb = x.index_select(0, idx)
            if augment is not None:
                seed = augment_seed(ep, b) if augment_seed is not None else \
                    int(torch.randint(0, 2**62, (1,), generator=generator))
                xb = augment(xb, seed)
            out = loss_fn(model, xb, y.index_select(0, idx))
            loss, reported = out if isinstance(out, tuple) else (out, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if on_step is not None and on_step(reported, len(idx)):
                return steps
        if on_epoch_end is not None:
            on_epoch_end(ep)
    return steps


def engine_loss(model: nn.Module, engine: str, full_batch: int) -> Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                                           torch.Tensor]:
    """``loss_fn(m, xb, yb)``: :func:`~fedlatent.distill.kernels.student_loss` of ``m`` on a minibatch whose
    ``backward()`` computes the parameters' gradient with ``engine``: 'autograd' (through the module), or an MTT
    step-kernel engine (:data:`fedlatent.distill.kernels.ENGINES`, e.g. 'fast': the ConvNet's hand-written
    backward, :func:`~fedlatent.distill.kernels.kernel_loss`). A model the kernel does not support trains by
    autograd, and so does a compiled kernel's minibatch of another size than ``full_batch`` (the last, smaller one
    of an epoch: compiled shapes are static, and one more compilation costs more than that minibatch)."""
    from .distill.kernels import ConvNetKernel, kernel_loss, make_kernel, student_loss
    from .models.functional import FlatModel

    def plain(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return student_loss(m(xb), yb)

    if engine == "autograd":
        return plain
    kernel = make_kernel(FlatModel(model), engine)
    if not isinstance(kernel, ConvNetKernel):
        return plain

    def through_kernel(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if kernel.compiled and xb.shape[0] != full_batch:
            return plain(m, xb, yb)
        return kernel_loss(kernel, m, xb, yb)

    return through_kernel


def fit_on_set(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, opt: torch.optim.Optimizer, *,
               epochs: int, batch_size: int, augment: Callable[[torch.Tensor, int | None], torch.Tensor] | None,
               generator: torch.Generator, on_epoch: Callable[[int], None] | None = None,
               engine: str = "autograd") -> float:
    """Train ``model`` in place on a small (synthetic) set: ``epochs`` shuffled passes of ``opt`` over
    minibatches, optionally augmented (DSA), with :func:`~fedlatent.distill.kernels.student_loss`
    (hard int labels or soft-label logits); the data go to the model's device and the model's mode is restored.

    Behind evaluating a distilled set, DynaFed's server fine-tuning and FedDGM's server training on the pool.
    Shuffles and augmentation seeds come from ``generator``; ``on_epoch(ep)`` runs before each epoch (e.g. an
    lr decay). ``engine``: how the gradient is computed (:func:`engine_loss`). Returns the mean minibatch loss
    (nan when no step was taken).
    """
    n = int(x_all.shape[0])
    if epochs <= 0 or n == 0:
        return math.nan
    device = next(model.parameters()).device
    x_all, y_all = x_all.detach().to(device), y_all.detach().to(device)
    was_training = model.training
    model.train()
    total = [0.0]

    def log(loss: torch.Tensor, _n: int) -> None:
        total[0] += float(loss.detach())

    loss_fn = engine_loss(model, engine, min(n, batch_size))
    steps = fit(model, x_all, y_all, opt, epochs=epochs, batch_size=batch_size, generator=generator,
                loss_fn=loss_fn, augment=augment, on_epoch=on_epoch, on_step=log)
    model.train(was_training)
    return total[0] / steps if steps else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on (x, y), in eval mode and without grad."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for i in range(0, int(y.shape[0]), batch_size):
            logits = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(int(y.shape[0]), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


__all__ = ["LR_SCHEDULES", "lr_factor", "schedule_lr", "fit", "engine_loss", "fit_on_set", "evaluate"]
