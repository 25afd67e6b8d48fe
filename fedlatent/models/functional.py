"""Flat-parameter, functional view of a model (for trajectory matching and fast aggregation).

``FlatModel(model)`` records the names/shapes of the model's parameters; ``flat.params(theta)``
turns a 1-D vector back into a name->tensor dict of views, and ``flat(theta, x)`` runs the model
functionally with :func:`torch.func.functional_call`. Buffers (e.g. BatchNorm statistics) are
taken from the module as they are.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class FlatModel:
    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.numel = sum(self.numels)

    def flatten(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's current parameters (or a name->tensor dict) as one flat vector (a copy)."""
        if params is None:
            params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if theta.numel() != self.numel:
            raise ValueError(f"flat vector has {theta.numel()} elements, model has {self.numel}")
        out, i = {}, 0
        for n, s, k in zip(self.names, self.shapes, self.numels):
            out[n] = theta[i : i + k].view(s)
            i += k
        return out

    def load(self, theta: torch.Tensor) -> nn.Module:
        """Copy a flat vector into the module's parameters in place."""
        with torch.no_grad():
            for (n, p), t in zip(self.model.named_parameters(), self.params(theta.detach()).values()):
                p.copy_(t)
        return self.model

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params(theta), (x,))
