"""The centralised upper bound of a federated run: all clients' data pooled in one place.

The same model, the same initial weights (``FLContext.build_model``: seeded by the run's seed) and the same
optimiser settings as the clients' local training (FLConfig ``lr``, ``momentum``, ``weight_decay``,
``batch_size``), for as many epochs over the pooled data as one client trains in the whole run
(``rounds * local_epochs``). One "round" here is ``local_epochs`` epochs, so the accuracy curve lines up with the
federated runs' rounds. No partition, no client schedule: the reference that says how much the federation
costs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..train import evaluate
from ..utils import torch_generator
from .base import FLConfig, FLContext
from .client import local_train


@dataclass
class CentralisedResult:
    """Accuracy of the centralised model after every "round" (``local_epochs`` epochs) and the final one."""

    curve: list[tuple[int, float]] = field(default_factory=list)
    final_accuracy: float = math.nan
    best_accuracy: float = math.nan
    wall_s: float = 0.0
    epochs: int = 0


def centralised(data, config: FLConfig, progress: bool = False) -> CentralisedResult:
    """Train ``config.model`` on the whole training set of ``data`` (every client's data pooled).

    Parameters
    ----------
    data : fedlatent.data.ImageData
        The data set; its training set is the union of the clients' partitions.
    config : FLConfig
        The federated run's settings: model, seed, device, rounds, local_epochs, lr, momentum, weight_decay,
        batch_size, eval_batch_size.
    progress : bool
        A progress bar over the rounds.
    """
    from tqdm import tqdm

    cfg = config.check()
    ctx = FLContext(config=cfg, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size,
                    class_names=list(data.classes), client_sizes=[int(len(data.y_train))], device=cfg.device,
                    mean=tuple(data.mean), std=tuple(data.std))
    model = ctx.build_model()
    x, y = data.x_train.to(cfg.device), data.y_train.to(cfg.device)
    xt, yt = data.x_test.to(cfg.device), data.y_test.to(cfg.device)
    gen = torch_generator(cfg.seed, "centralised")
    out = CentralisedResult(epochs=cfg.rounds * cfg.local_epochs)
    t0 = time.perf_counter()
    for rnd in tqdm(range(1, cfg.rounds + 1), desc="centralised", disable=not progress, leave=False):
        local_train(model, x, y, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, generator=gen,
                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        out.curve.append((rnd, evaluate(model, xt, yt, cfg.eval_batch_size)["accuracy"]))
    out.wall_s = time.perf_counter() - t0
    if out.curve:
        out.final_accuracy = out.curve[-1][1]
        out.best_accuracy = max(a for _, a in out.curve)
    return out


__all__ = ["centralised", "CentralisedResult"]
