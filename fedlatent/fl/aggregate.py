"""Pure aggregation maths: FedAvg's weighted mean and FedProx's proximal term.

Both functions are free of side effects and work on flat vectors or name->tensor dicts, so every
strategy (and a later Flower/Ray front end) can reuse them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..utils import FedLatentError

TensorDict = Mapping[str, torch.Tensor]


def _normalised_weights(weights: Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    if w.numel() != n:
        raise FedLatentError(f"fedavg: {n} inputs but {w.numel()} weights")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise FedLatentError("fedavg: weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise FedLatentError("fedavg: weights sum to zero")
    return w / total


def _weighted_mean(tensors: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    ref = tensors[0]
    for t in tensors[1:]:
        if t.shape != ref.shape:
            raise FedLatentError(f"fedavg: shape mismatch {tuple(t.shape)} vs {tuple(ref.shape)}")
    # Accumulate in float64 (float128 does not exist in torch; complex stays complex) so the
    # mean of float32 inputs is exact to float32 rounding and float64 inputs lose at most ~1 ulp.
    acc_dtype = torch.complex128 if ref.is_complex() else torch.float64
    acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
    for wi, t in zip(w.tolist(), tensors):
        acc.add_(t.to(acc_dtype), alpha=wi)
    if ref.is_floating_point() or ref.is_complex():
        return acc.to(ref.dtype)
    # Integer buffers (e.g. BatchNorm's num_batches_tracked): weighted mean rounded to nearest.
    return acc.round().to(ref.dtype)


def fedavg(models: Sequence[torch.Tensor | TensorDict], weights: Sequence[float] | torch.Tensor):
    """FedAvg aggregation (McMahan et al., 2017, Alg. 1): w_{t+1} = sum_k (n_k / n) w^k_{t+1}.

    ``models`` is a list of flat vectors or of name->tensor dicts (all with the same keys and shapes);
    ``weights`` (typically the clients' sample counts n_k) are normalised to sum to one. Returns a
    tensor / dict of the same kind and dtype as the inputs, computed in float64.
    """
    if len(models) == 0:
        raise FedLatentError("fedavg: nothing to aggregate")
    w = _normalised_weights(weights, len(models))
    first = models[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(m, torch.Tensor) for m in models):
            raise FedLatentError("fedavg: mix of tensors and dicts")
        return _weighted_mean(list(models), w)
    keys = list(first.keys())
    for m in models[1:]:
        if isinstance(m, torch.Tensor) or set(m.keys()) != set(keys):
            raise FedLatentError("fedavg: inputs have different keys")
    return {k: _weighted_mean([m[k] for m in models], w) for k in keys}


def fedprox_term(params: Sequence[torch.Tensor] | TensorDict | torch.Tensor,
                 global_params: Sequence[torch.Tensor] | TensorDict | torch.Tensor, mu: float) -> torch.Tensor:
    """FedProx proximal term (Li et al., 2020, eq. 2): (mu / 2) * ||w - w^t||^2.

    ``params`` are the local weights w (differentiable), ``global_params`` the global weights w^t the
    round started from (treated as constants). Accepts flat tensors, lists, or dicts (matched by key).
    Its gradient w.r.t. w is mu * (w - w^t).
    """
    if isinstance(params, torch.Tensor):
        pairs = [(params, global_params)]
    elif isinstance(params, Mapping):
        pairs = [(params[k], global_params[k]) for k in params]
    else:
        params, global_params = list(params), list(global_params)
        if len(params) != len(global_params):
            raise FedLatentError("fedprox_term: params and global_params differ in length")
        pairs = list(zip(params, global_params))
    total = None
    for p, g in pairs:
        s = (p - g.detach()).pow(2).sum()
        total = s if total is None else total + s
    if total is None:
        raise FedLatentError("fedprox_term: no parameters")
    return 0.5 * mu * total


__all__ = ["fedavg", "fedprox_term"]
