"""FedDGM+FedAvg (``feddgm+avg``): a hybrid beyond the FedDGM paper. Each round the global model is FedAvg's
aggregate of the clients' models, then fine-tuned on FedDGM's pooled distilled sets, as DynaFed fine-tunes every
aggregate on its pseudo set. The global model keeps the clients' real-data gradients (FedAvg) and gains the
distilled sets' view of all clients at once.

One round (FedDGM's, :mod:`fedlatent.fl.methods.feddgm`, with step 3 replaced):

1. **Clients** as in FedDGM: train the downloaded global model for ``local_epochs`` and upload ``{"start", "end"}``.
   The global model *is* the surrogate (FLConfig ``model`` == ``surrogate``), since its FedAvg aggregate is the
   next global model; setup refuses anything else.
2. **FedAvg**: ``w_avg = sum_k (n_k / n) end_k`` over the uploads that start at the sent model (McMahan et al.,
   AISTATS 2017, Alg. 1; :func:`fedlatent.fl.aggregate.fedavg` with n_k = ``num_samples``, in the engine's
   upload order). That is exactly what :class:`fedlatent.fl.methods.fedavg.FedAvg` computes; as in FedAvg, a
   client that did not move (``end == start``) still counts in the mean. ``w_avg`` is loaded into the global model.
3. **Distillation** as in FedDGM (the same seeds, so the same sets for the same uploads): one latent-MTT set per
   client that moved, matching its ``start -> end`` segment, pooled (``pool``: this round's or all rounds').
4. **Fine-tuning** (DynaFed's server step, Pi et al., CVPR 2023; :mod:`fedlatent.fl.methods.dynafed`):
   the global model trains from ``w_avg`` on the pool with FedDGM's server training
   (:meth:`~fedlatent.fl.methods.feddgm.FedDGM._train_on_pool`, :func:`fedlatent.train.fit_on_set`):
   ``train_epochs`` epochs of SGD (``train_lr``, ``train_momentum``, ``train_weight_decay``, minibatches of
   ``train_batch``, DSA when ``train_dsa``). The result is the next round's download.

``train_epochs = 0`` gives FedAvg's global model exactly (the distillation still runs and its sets are kept).
If no set survives the distillation the round ends with ``w_avg`` (FedAvg) unchanged.

Round metrics: FedDGM's, plus ``fedavg_step`` (``||w_avg - w_sent||_2``), ``finetune_loss`` (the fine-tuning's
mean minibatch loss; FedDGM's ``server_train_loss`` column holds the same number) and ``finetune_shift``
(``||w - w_avg||_2``, how far the fine-tuning moved the aggregate).

Measured (``benchmarks/feddgm.py``, RESULTS.md "The acceptance grid, third part"; 10 clients, 10 rounds, 2 seeds):
run the clients as FedAvg-m's are, with FLConfig ``momentum=0.9``. So configured it is the best federated method at
Dirichlet α 0.01 and 0.1 on CIFAR-10 and Fashion-MNIST, above FedAvg (plain and momentum), DynaFed and FedDGM; at
α 0.5 it is above plain FedAvg and DynaFed but 1.1–1.2 points below FedAvg-m on the mean. With plain-SGD clients it
trails FedAvg-m.

Options: :class:`FedDGMAvgConfig`. In a Flower run config they go as ``method-options.<name>`` or in the quoted
table ``[tool.flwr.app.config."feddgm+avg"]`` (a bare TOML key cannot hold the ``+``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import FedLatentError
from ..aggregate import fedavg
from ..base import FLContext, Upload, register_method
from .feddgm import FedDGM, FedDGMConfig

log = logging.getLogger("fedlatent.fl.feddgm_avg")


@dataclass
class FedDGMAvgConfig(FedDGMConfig):
    """Options of :class:`FedDGMAvg`: FedDGM's, with the same meanings and reference defaults, except that the
    server training fields drive the fine-tuning of the FedAvg aggregate (module docstring, step 4):
    ``train_epochs`` (its default here is DynaFed's), ``train_lr``, ``train_schedule``, ``train_momentum``,
    ``train_weight_decay``, ``train_batch`` and ``train_dsa``. ``surrogate`` must be FLConfig ``model``."""

    owner: ClassVar[str] = "feddgm+avg"

    train_epochs: int = 8
    """Fine-tuning epochs of the FedAvg aggregate on the pool per round, with FedDGM's server optimiser
    (``train_lr``, ``train_schedule``, ``train_momentum``, ``train_weight_decay``, ``train_batch``, ``train_dsa``)
    [DynaFed ``finetune_epochs``: 8 on Fashion-MNIST, 20 on CIFAR-10; FedDGM trains 1000 epochs]; 0 = FedAvg exactly."""


@register_method("feddgm+avg")
class FedDGMAvg(FedDGM):
    """FedDGM+FedAvg: FedAvg's aggregate of the clients' models, fine-tuned on FedDGM's pooled distilled sets.

    Options: :class:`FedDGMAvgConfig` (``FedDGMAvg(config)`` or ``FedDGMAvg(**options)``).
    """

    config_class = FedDGMAvgConfig
    label: ClassVar[str] = "FedDGM+FedAvg"

    def setup(self, ctx: FLContext) -> None:
        if self.surrogate_spec != ctx.config.model:
            raise FedLatentError(f"{self.name}: the global model must be the surrogate (FedAvg averages the clients' "
                                 f"surrogates into it); got model {ctx.config.model!r}, surrogate "
                                 f"{self.surrogate_spec!r}")
        super().setup(ctx)

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        trusted, moved, extra = self._screen(rnd, uploads)
        if not trusted:
            log.warning("round %d: no upload starts at the global model; the global state is unchanged", rnd)
            return extra
        sent = self._sent[1] if self._sent is not None else self.flat.flatten()
        keep = {id(u) for u in trusted}
        avg_in = [u for u in uploads if id(u) in keep]  # FedAvg's order: the same float64 sums, the same bits
        w_avg = fedavg([u.tensors["end"] for u in avg_in], [u.num_samples for u in avg_in])
        self.flat.load(w_avg)
        extra["fedavg_step"] = float((w_avg.double() - sent.double()).norm())
        if not moved:
            log.warning("round %d: no client trajectory to distil; the FedAvg aggregate is not fine-tuned", rnd)
            return extra
        extra = self._distil_and_train(rnd, moved, extra)
        if "server_train_loss" in extra:  # the pool was trained on (some set survived the distillation)
            extra["finetune_loss"] = extra["server_train_loss"]
            extra["finetune_shift"] = float((self.flat.flatten().double() - w_avg.double()).norm())
        return extra


__all__ = ["FedDGMAvg", "FedDGMAvgConfig"]
