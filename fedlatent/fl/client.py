"""Local training (central evaluation: :func:`fedlatent.train.evaluate`, re-exported here).

:func:`local_train` is the client-side work of FedAvg / FedProx (and of any method whose clients run
local SGD): ``epochs`` passes over the local data with a seeded shuffle, SGD with momentum and weight
decay, and optionally the FedProx proximal term - :func:`fedlatent.train.fit` with that objective. :func:`train_client` wraps it into the
payload -> :class:`Upload` step with the seeding convention of the engine: the shuffle of client c in
round r comes from the stream (seed, "client", r, c), independent of which other clients run.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from ..errors import FedLatentError
from ..train import engine_loss, evaluate, fit  # noqa: F401 - evaluate re-exported (old path)
from ..utils import torch_generator
from .aggregate import fedprox_term
from .base import ClientData, FLContext, TensorDict, Upload


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
    mu: float = 0.0,
    privacy: object | None = None,
    engine: str = "autograd",
) -> dict[str, float]:
    """Train ``model`` in place on (x, y) with mini-batch SGD; returns {"train_loss", "steps"}.

    Objective per batch: cross-entropy + (mu / 2) ||w - w_g||^2 when ``mu > 0`` (FedProx eq. 2;
    ``global_params`` maps parameter names to w_g). Weight decay is SGD's L2 term. The batch order of
    every epoch is ``torch.randperm`` drawn from ``generator`` (a CPU generator), the last batch may be
    smaller. ``train_loss`` is the mean cross-entropy over all samples seen (prox term excluded).
    ``privacy`` (a :class:`fedlatent.privacy.dp.ClientPrivacy`) makes it DP-SGD instead. ``engine``: how the
    cross-entropy's gradient is computed (:func:`fedlatent.train.engine_loss`: 'autograd', or an MTT kernel engine
    such as 'fast', bf16 convolutions + torch.compile for a ConvNet); DP-SGD needs 'autograd'.
    """
    if privacy is not None:
        if engine != "autograd":
            raise FedLatentError(f"DP-SGD computes per-sample gradients by autograd: the client engine must be "
                                 f"'autograd', got {engine!r}")
        from ..privacy.dp import dp_local_train

        return dp_local_train(model, x, y, privacy=privacy, epochs=epochs, lr=lr, batch_size=batch_size,
                              generator=generator, momentum=momentum, weight_decay=weight_decay,
                              global_params=global_params, mu=mu)
    n = int(y.shape[0])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    prox = None
    if mu > 0:
        if global_params is None:
            raise ValueError("local_train: mu > 0 needs global_params")
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        prox = ([p for _, p in named], [global_params[k].to(p.device) for k, p in named])
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    acc = {"loss_sum": 0.0, "seen": 0}

    cross_entropy = engine_loss(model, engine, min(n, batch_size))

    def objective(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        ce = cross_entropy(m, xb, yb)
        return (ce if prox is None else ce + fedprox_term(prox[0], prox[1], mu)), ce

    def log(ce: torch.Tensor, nb: int) -> None:
        acc["loss_sum"] = acc["loss_sum"] + ce.detach() * nb  # a tensor: no device sync per step
        acc["seen"] += nb

    steps = fit(model, x, y, opt, epochs=epochs, batch_size=batch_size, generator=generator, loss_fn=objective,
                on_step=log)
    seen = acc["seen"]
    return {"train_loss": float(acc["loss_sum"]) / seen if seen else math.nan, "steps": float(steps)}


def _privacy(ctx: FLContext, client_id: int):
    """The client's DP-SGD settings (None without ``config.dp``)."""
    if not getattr(ctx.config, "dp", False):
        return None
    from ..privacy.dp import client_privacy

    return client_privacy(ctx, client_id)


_TEMPLATES: dict[tuple, nn.Module] = {}


def client_model(ctx: FLContext, spec: str | None = None) -> nn.Module:
    """A private model instance of ``spec`` (default ``ctx.config.model``) for local training.

    Copies a per-process template, so no global RNG is consumed; the caller loads the weights.
    """
    key = (spec or ctx.config.model, ctx.channels, ctx.num_classes, ctx.image_size, str(ctx.device))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = ctx.build_model(spec, key="client-template")
    return copy.deepcopy(_TEMPLATES[key])


def train_client(ctx: FLContext, rnd: int, payload: TensorDict, data: ClientData, mu: float = 0.0,
                 spec: str | None = None) -> Upload:
    """Load ``payload`` (a full state_dict) into a fresh model, run :func:`local_train`, upload the new state_dict."""
    cfg = ctx.config
    model = client_model(ctx, spec)
    model.load_state_dict(payload)
    metrics = local_train(
        model, data.x, data.y, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        generator=torch_generator(cfg.seed, "client", rnd, data.client_id),
        global_params=payload if mu > 0 else None, mu=mu, privacy=_privacy(ctx, data.client_id),
    )
    tensors = {k: v.detach() for k, v in model.state_dict().items()}  # the model is private: no copy needed
    return Upload(client_id=data.client_id, tensors=tensors, num_samples=len(data), metrics=metrics)


__all__ = ["local_train", "client_model", "train_client", "evaluate"]
