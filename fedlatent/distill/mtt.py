"""Matching Training Trajectories (MTT; Cazenavette et al., CVPR 2022) as small pure functions.

One distillation iteration (ALGORITHMS.md §1): the student starts at an expert snapshot
``theta_0 = theta*_t`` and takes ``N`` SGD steps on the (augmented) synthetic set,

    theta_{n+1} = theta_n - alpha * grad_theta l(f(theta_n; A_n(X[b_n])), Y[b_n]),        (MTT eq. 1)

with a learnable step size ``alpha = exp(log_lr)``, minibatch indices ``b_n`` and augmentation
seeds drawn from a seeded :func:`make_plan`. The loss is

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2                     (MTT eq. 2)

and its gradients go to the images X, to ``log_lr`` and (DynaFed) to learnable soft labels.

Two ways to differentiate, with identical results:

* ``mode="unrolled"``: keep every step's graph and back-propagate through all of them
  (memory grows with N). With the autograd engine this is literally ``create_graph=True``
  through all N steps and one ``backward``; with the ConvNet engine every step keeps its
  activations and the backward walk applies the R-operator to them.
* ``mode="exact"``: constant activation memory. The forward pass keeps only the flat vectors
  ``theta_n`` and ``g_n`` and the plan; the backward walk n = N-1 .. 0 recomputes step n and
  propagates, with ``u = -alpha v_{n+1}``,

      v_n = v_{n+1} + H_n u                  (H_n: Hessian of the step-n loss at theta_n)
      dX += (d g_n / d X)^T u,  d log_lr += g_n . u,  d labels += (d g_n / d labels)^T u,

  starting from ``v_N = dL/dtheta_N = 2 (theta_N - theta*) / ||theta*_t - theta*_{t+M}||^2``.
  (``d log_lr = alpha dL/dalpha = -alpha g_n . v_{n+1} = g_n . u``.) Same gradient as unrolling,
  activations of a single step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .. import ops
from ..models.functional import FlatModel
from ..errors import DivergedError, FedLatentError
from ..utils import derive_seed, torch_generator
from .kernels import AutogradKernel, ConvNetKernel, make_kernel, student_loss

Augment = Callable[[torch.Tensor, "int | None"], torch.Tensor]


@dataclass(frozen=True)
class StepPlan:
    """What student step n uses: minibatch indices into the synthetic set and an augmentation seed."""

    indices: torch.Tensor
    seed: int | None


@dataclass
class MetaGrad:
    """Result of one MTT iteration: the loss and its gradients (all detached)."""

    loss: float
    grad_images: torch.Tensor
    grad_log_lr: torch.Tensor
    grad_labels: torch.Tensor | None
    theta_end: torch.Tensor
    param_dist: float  # ||theta*_t - theta*_{t+M}||^2


def make_plan(num_images: int, syn_steps: int, batch_syn: int, seed: int, augment: bool = True) -> list[StepPlan]:
    """Minibatches as in the MTT reference (shuffled chunks of a permutation, a new permutation
    when one is used up) and one augmentation seed per step, all from ``seed``."""
    if num_images < 1:
        raise FedLatentError("the synthetic set is empty")
    if syn_steps < 1:
        raise FedLatentError(f"syn_steps must be >= 1, got {syn_steps}")
    if not 1 <= batch_syn <= num_images:
        raise FedLatentError(f"batch_syn must be in [1, {num_images}] (the synthetic set size), got {batch_syn}")
    gen = torch_generator(seed, "mtt-plan")
    plan: list[StepPlan] = []
    chunks: list[torch.Tensor] = []
    for n in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(num_images, generator=gen), batch_syn))
        plan.append(StepPlan(chunks.pop(), derive_seed(seed, "mtt-aug", n) if augment else None))
    return plan


def trajectory_loss(theta_end: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """MTT eq. 2: ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (:func:`fedlatent.ops.trajectory_loss`:
    one fused pass on CUDA, this expression elsewhere)."""
    return ops.trajectory_loss(theta_end, theta_start, theta_target)


def student_step(model: FlatModel, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 log_lr: torch.Tensor, step: StepPlan, augment: Augment | None = None,
                 create_graph: bool = False) -> torch.Tensor:
    """MTT eq. 1: one SGD step of the functional student on augmented minibatch ``step``.

    With ``create_graph=True`` the result stays differentiable w.r.t. theta, images, labels and
    log_lr (this is how the unrolled autograd mode chains the steps).
    """
    x = images[step.indices]
    if augment is not None:
        x = augment(x, step.seed)
    with torch.enable_grad():
        if not theta.requires_grad:
            theta = theta.detach().requires_grad_(True)
        loss = student_loss(model(theta, x), labels[step.indices])
        (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return ops.sgd_step(theta, g, log_lr.exp())  # theta - lr * g


# ------------------------------------------------------------------------------------------------
def tune_allocator() -> bool:
    """Let glibc reuse freed large blocks instead of mapping fresh pages for every big tensor.

    PyTorch's CPU allocator returns tensors above 32 MB (a 100 x 128 x 32 x 32 float map is 52 MB)
    to the OS at once, so every new activation page-faults 13 000 fresh pages: on the MTT
    benchmark that costs more than the arithmetic of most elementwise kernels. Setting
    ``M_MMAP_MAX = 0`` and a huge ``M_TRIM_THRESHOLD`` keeps them in the heap for reuse. Process-wide
    and opt-in (the CLI and the benchmark call it); returns False where it is not available.
    """
    global _LIBC
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False
    _LIBC = libc if ok else None
    return ok


_LIBC = None


def _release_free_memory() -> None:
    """After an unrolled iteration under :func:`tune_allocator`: hand the heap's free pages back
    (``malloc_trim``), so that fragmentation cannot pile up from one iteration to the next."""
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            pass


def _as_flat(model: nn.Module | FlatModel) -> FlatModel:
    return model if isinstance(model, FlatModel) else FlatModel(model)


def validate_inputs(flat: FlatModel, theta_start: torch.Tensor, theta_target: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor, log_lr: torch.Tensor) -> float:
    """Check shapes and values; returns ``||theta_start - theta_target||^2``."""
    for name, t in (("start", theta_start), ("target", theta_target)):
        if t.ndim != 1 or t.numel() != flat.numel:
            raise FedLatentError(f"{name} parameters have shape {tuple(t.shape)}; the student "
                                 f"{type(flat.model).__name__} needs a flat vector of {flat.numel}")
        if not torch.isfinite(t).all():
            raise DivergedError(f"{name} parameters contain NaN/inf")
    if images.ndim != 4:
        raise FedLatentError(f"synthetic images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise FedLatentError(f"{labels.shape[0]} labels for {images.shape[0]} synthetic images")
    if labels.dtype.is_floating_point:
        if labels.ndim != 2:
            raise FedLatentError(f"soft labels must be [N, num_classes] logits, got shape {tuple(labels.shape)}")
    elif labels.ndim != 1:
        raise FedLatentError(f"hard labels must be a vector of class indices, got shape {tuple(labels.shape)}")
    if log_lr.numel() != 1 or not torch.isfinite(log_lr).all():
        raise FedLatentError(f"log_lr must be one finite number, got {log_lr}")
    dist = float((theta_start.double() - theta_target.double()).pow(2).sum())
    if not dist > 0:
        raise FedLatentError("start and target parameters are identical: the trajectory loss is undefined")
    if not torch.isfinite(images).all():
        raise DivergedError("synthetic images contain NaN/inf")
    return dist


def _check_finite(what: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t is not None and not torch.isfinite(t).all():
            raise DivergedError(f"non-finite {what} in trajectory matching (diverged: lower lr_img/lr_lr or the "
                                 f"initial lr); the last good synthetic set is kept")


def meta_gradient(model: nn.Module | FlatModel, theta_start: torch.Tensor, theta_target: torch.Tensor,
                  images: torch.Tensor, labels: torch.Tensor, log_lr: torch.Tensor | float,
                  plan: Sequence[StepPlan], augment: Augment | None = None, mode: str = "exact",
                  engine: str = "auto") -> MetaGrad:
    """One MTT iteration: run the student along ``plan`` and return the loss and its gradients.

    ``images`` [N, C, H, W] (detached; the gradient is returned, not accumulated), ``labels``
    int [N] or soft-label logits [N, K], ``log_lr`` the log of the student step size.
    ``mode`` 'exact' (constant memory) or 'unrolled'; ``engine`` one of
    :data:`~fedlatent.distill.kernels.ENGINES` ('auto', 'convnet', 'convnet-bf16', 'convnet-compiled',
    'convnet-bf16-compiled', 'autograd'; see :func:`~fedlatent.distill.kernels.make_kernel`).
    Raises :class:`FedLatentError` on bad input, :class:`DivergedError` on a non-finite loss/gradient.
    """
    flat = _as_flat(model)
    log_lr = torch.as_tensor(log_lr, dtype=images.dtype, device=images.device).detach().reshape(())
    dist = validate_inputs(flat, theta_start, theta_target, images, labels, log_lr)
    if mode not in ("exact", "unrolled"):
        raise FedLatentError(f"unknown MTT mode {mode!r} (exact, unrolled)")
    if not plan:
        raise FedLatentError("empty step plan (syn_steps must be >= 1)")
    n_img = images.shape[0]
    for st in plan:
        if st.indices.numel() == 0 or int(st.indices.max()) >= n_img or int(st.indices.min()) < 0:
            raise FedLatentError(f"plan indices out of range for {n_img} synthetic images")
    kernel = make_kernel(flat, engine)
    images = images.detach()
    labels = labels.detach()
    theta_start = theta_start.detach().to(images.dtype)
    theta_target = theta_target.detach().to(images.dtype)
    try:
        if mode == "unrolled" and isinstance(kernel, AutogradKernel):
            res = _unrolled_autograd(flat, theta_start, theta_target, images, labels, log_lr, plan, augment)
        else:
            res = _adjoint(kernel, theta_start, theta_target, images, labels, log_lr, plan, augment,
                           keep_all=(mode == "unrolled"))
        if mode == "unrolled":
            _release_free_memory()
    except RuntimeError as e:
        if isinstance(e, FedLatentError):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "shape" in msg or "size" in msg or "channels" in msg or "mat1" in msg:
            raise FedLatentError(f"synthetic images {tuple(images.shape[1:])} do not fit the student "
                                 f"{type(flat.model).__name__}: {msg}") from None
        raise
    res.param_dist = dist
    _check_finite("loss/gradient", torch.tensor(res.loss), res.grad_images, res.grad_log_lr, res.grad_labels)
    return res


def _augmented(images: torch.Tensor, step: StepPlan, augment: Augment | None, grad: bool):
    """The augmented minibatch of ``step``; with ``grad`` also the leaf it was computed from."""
    xb = images[step.indices]
    if grad:
        xb = xb.detach().requires_grad_(True)
    with torch.set_grad_enabled(grad):
        xa = augment(xb, step.seed) if augment is not None else xb
    return xb, xa


def _unrolled_autograd(flat: FlatModel, theta_start, theta_target, images, labels, log_lr, plan, augment) -> MetaGrad:
    """Literal unrolling: ``create_graph=True`` through every step, one backward at the end."""
    soft = labels.dtype.is_floating_point
    X = images.clone().requires_grad_(True)
    Y = labels.clone().requires_grad_(soft)
    ll = log_lr.clone().requires_grad_(True)
    theta = theta_start.clone().requires_grad_(True)
    with torch.enable_grad():
        for st in plan:
            theta = student_step(flat, theta, X, Y, ll, st, augment, create_graph=True)
        loss = trajectory_loss(theta, theta_start, theta_target)
        inputs = [X, ll] + ([Y] if soft else [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]
    return MetaGrad(float(loss.detach()), grads[0].detach(), grads[1].detach(), grads[2].detach() if soft else None,
                    theta.detach(), 0.0)


def _adjoint(kernel, theta_start, theta_target, images, labels, log_lr, plan, augment, keep_all: bool) -> MetaGrad:
    """Forward pass keeping theta_n, g_n (and, if ``keep_all``, every step's activations), then the
    adjoint walk n = N-1 .. 0 (recomputing step n when its activations were not kept: ``kernel.recompute_rop``,
    which the compiled ConvNet kernel runs as one graph)."""
    soft = labels.dtype.is_floating_point
    alpha = float(log_lr.exp())
    thetas, gs, kept = [theta_start], [], []
    theta = theta_start
    for st in plan:
        if keep_all:
            xb, xa = _augmented(images, st, augment, grad=True)
            _, g, cache = kernel.forward(theta, xa.detach(), labels[st.indices], keep=True, lean=True)
            kept.append((xb, xa, cache))
        else:
            _, xa = _augmented(images, st, augment, grad=False)
            _, g, _ = kernel.forward(theta, xa, labels[st.indices], keep=False)
        gs.append(g)
        theta = ops.sgd_step(theta, g, alpha)  # theta - alpha * g
        thetas.append(theta)
    _check_finite("student loss/gradient", theta)  # a non-finite g_n makes every later theta non-finite
    # loss and v_N = dL/dtheta_N = 2 (theta - theta_target) / ||theta_start - theta_target||^2
    loss, v = ops.trajectory_loss_and_grad(theta, theta_start, theta_target)
    dX = torch.zeros_like(images)
    dY = torch.zeros_like(labels) if soft else None
    dlog = torch.zeros((), dtype=images.dtype, device=images.device)
    for n in range(len(plan) - 1, -1, -1):
        st = plan[n]
        u = -alpha * v
        dlog += (gs[n] * u).sum()
        if keep_all:
            xb, xa, cache = kept.pop()
            hu, dxa, dyb = kernel.rop(cache, u, need_theta=n > 0)
            del cache
        else:
            xb, xa = _augmented(images, st, augment, grad=True)
            hu, dxa, dyb = kernel.recompute_rop(thetas[n], xa.detach(), labels[st.indices], u, need_theta=n > 0)
        if n > 0:
            v = v + hu
        if xa is not xb and xa.requires_grad:
            (dxb,) = torch.autograd.grad(xa, xb, dxa.to(xa.dtype))
        else:
            dxb = dxa
        dX.index_add_(0, st.indices.to(dX.device), dxb.to(dX.dtype))
        if soft:
            dY.index_add_(0, st.indices.to(dY.device), dyb.to(dY.dtype))
    return MetaGrad(float(loss), dX, dlog, dY, theta, 0.0)


__all__ = ["StepPlan", "MetaGrad", "make_plan", "trajectory_loss", "student_step", "student_loss", "meta_gradient",
           "validate_inputs", "tune_allocator", "ConvNetKernel", "AutogradKernel", "make_kernel"]
