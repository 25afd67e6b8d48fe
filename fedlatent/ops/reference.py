"""Pure-PyTorch reference of every fedlatent op: what runs on CPU, with ``FEDLATENT_OPS=ref``, and as the
fallback when the CUDA extension cannot be built.

Each function is literally the expression the rest of fedlatent used before the ops existed, so the CPU
numbers do not change; autograd (of any order) comes from PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, alpha: float = 0.2,
             gain: float = SQRT2) -> torch.Tensor:
    """``leaky_relu(x + b, alpha) * gain`` with ``b`` broadcast along dimension ``dim`` of ``x``."""
    if b is not None:
        dim = dim % x.ndim
        x = x + b.view([-1 if d == dim else 1 for d in range(x.ndim)])
    return F.leaky_relu(x, alpha) * gain


def sgd_step(theta: torch.Tensor, g: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """One SGD step on a flat parameter vector, ``theta - lr * g`` (MTT eq. 1)."""
    return theta - lr * g


def trajectory_loss(theta_end: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """MTT eq. 2: ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2``."""
    return (theta_end - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()


def trajectory_loss_and_grad(theta_end: torch.Tensor, theta_start: torch.Tensor,
                             theta_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of MTT eq. 2 and its gradient w.r.t. ``theta_end``, ``2 (theta_N - theta*) / ||theta_0 - theta*||^2``
    (the adjoint's starting vector ``v_N`` of the exact backward)."""
    loss = trajectory_loss(theta_end, theta_start, theta_target)
    return loss, 2.0 * (theta_end - theta_target) / (theta_start - theta_target).pow(2).sum()


def dsa_augment(x: torch.Tensor, draw, dsa) -> torch.Tensor:
    """Apply the drawn DSA parameters group by group (:meth:`fedlatent.distill.augment.DSA.apply_reference`)."""
    return dsa.apply_reference(x, draw)


__all__ = ["bias_act", "sgd_step", "trajectory_loss", "trajectory_loss_and_grad", "dsa_augment", "SQRT2"]
