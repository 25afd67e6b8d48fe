"""The trajectory-matching optimisation loop (MTT, DynaFed, FedDGM all run it).

:class:`Distiller` repeats MTT iterations (:func:`fedlatent.distill.mtt.meta_gradient`) on any
:class:`fedlatent.synthetic.SyntheticSet` (pixels, generator latents): render the images, get the
loss and d loss / d images, hand that to ``synthetic.backward`` and step the optimisers
(reference defaults: SGD momentum 0.5 for the images/latents, for the learnable lr and for soft
labels). Expert segments come from a *segment sampler* -- any callable ``sampler(it) ->
(theta_start, theta_target)``; :class:`TrajectorySampler` draws them from expert trajectories as
MTT (start uniform in [0, max_start_epoch), target = start + expert_epochs) or DynaFed (target =
average of several later snapshots).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..models.functional import FlatModel
from ..synthetic import SyntheticSet
from ..errors import DivergedError, FedLatentError, is_diverged
from ..utils import derive_seed
from .augment import DEFAULT_STRATEGY, DSA
from .kernels import make_kernel
from .mtt import MetaGrad, make_plan, meta_gradient
from .samplers import Segment, TrajectorySampler  # noqa: F401 - TrajectorySampler re-exported (old path)

@dataclass
class DistillConfig:
    """Options of the MTT loop (reference defaults where they exist).

    ``lr_lr`` is the SGD step on ``log(lr)``: the reference's 1e-5 on the lr itself at lr 0.01
    corresponds to ``1e-5 / 0.01**2 = 0.1`` here (``d log_lr = lr * d lr``).
    """

    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    batch_syn: int | None = None  # None: the whole synthetic set every step
    lr_img: float = 1000.0
    lr_lr: float = 0.1
    lr_label: float = 2.0
    lr_teacher: float = 0.01  # initial student lr
    momentum: float = 0.5
    mode: str = "exact"  # exact | unrolled
    engine: str = "auto"  # auto | fast | convnet | convnet-bf16 (bf16 convolutions) | convnet[-bf16]-compiled | autograd
    dsa: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    dsa_siamese: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.syn_steps < 1:
            raise FedLatentError(f"syn_steps must be >= 1, got {self.syn_steps}")
        if self.expert_epochs < 1:
            raise FedLatentError(f"expert_epochs must be >= 1, got {self.expert_epochs}")
        if self.max_start_epoch < 1:
            raise FedLatentError(f"max_start_epoch must be >= 1, got {self.max_start_epoch}")
        if self.mode not in ("exact", "unrolled"):
            raise FedLatentError(f"mode must be 'exact' or 'unrolled', got {self.mode!r}")
        if not self.lr_teacher > 0:
            raise FedLatentError(f"lr_teacher (initial student lr) must be > 0, got {self.lr_teacher}")
        for k in ("lr_img", "lr_lr", "lr_label"):
            if getattr(self, k) < 0:
                raise FedLatentError(f"{k} must be >= 0, got {getattr(self, k)}")


@dataclass
class IterationLog:
    it: int
    loss: float
    lr: float
    start_dist: float


class Distiller:
    """Optimise a synthetic set by trajectory matching.

    ``labels``: int class indices (fixed) or float soft-label logits [N, K] (learned, DynaFed).
    ``image_optimizer``: optional optimiser over ``synthetic.parameters()`` (e.g. several lrs for
    generator latents); default SGD(lr_img, momentum).
    """

    def __init__(self, model: nn.Module, synthetic: SyntheticSet, labels: torch.Tensor,
                 sampler: Callable[[int], Segment], config: DistillConfig | None = None,
                 image_optimizer: torch.optim.Optimizer | None = None):
        self.config = cfg = config or DistillConfig()
        cfg.validate()
        if not isinstance(synthetic, SyntheticSet):
            raise FedLatentError(f"{type(synthetic).__name__} does not implement render/backward/parameters")
        self.flat = FlatModel(model)
        self.kernel_name = make_kernel(self.flat, cfg.engine).name
        self.synthetic, self.sampler = synthetic, sampler
        images = synthetic.render()
        if labels.shape[0] != images.shape[0]:
            raise FedLatentError(f"{labels.shape[0]} labels for {images.shape[0]} synthetic images")
        self.soft = labels.dtype.is_floating_point
        self.labels = labels.detach().clone().to(images.device)
        if self.soft:
            self.labels = self.labels.to(images.dtype).requires_grad_(True)
        self.log_lr = torch.tensor(math.log(cfg.lr_teacher), dtype=images.dtype, device=images.device,
                                   requires_grad=True)
        self.batch_syn = cfg.batch_syn or images.shape[0]
        self.augment = DSA(cfg.dsa_strategy, siamese=cfg.dsa_siamese) if cfg.dsa else None
        self.opt_img = image_optimizer or torch.optim.SGD(synthetic.parameters(), lr=cfg.lr_img, momentum=cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.log_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        self.opt_label = torch.optim.SGD([self.labels], lr=cfg.lr_label, momentum=cfg.momentum) if self.soft else None
        self.history: list[IterationLog] = []
        self.it = 0
        self.failure: str | None = None  # where run(stop_on_divergence=True) stopped

    @property
    def lr(self) -> float:
        return float(self.log_lr.detach().exp())

    def _params(self) -> list[torch.Tensor]:
        return list(self.synthetic.parameters()) + [self.log_lr] + ([self.labels] if self.soft else [])

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_img, self.opt_lr, self.opt_label) if o is not None]

    def compute(self) -> MetaGrad:
        """The meta-gradient of the current iteration (MTT eqs. 1-2): this iteration's expert segment, the
        rendered set and the seeded step plan; nothing is updated (:meth:`apply` does that)."""
        cfg, it = self.config, self.it
        theta_start, theta_target = self.sampler(it)
        images = self.synthetic.render()
        plan = make_plan(images.shape[0], cfg.syn_steps, self.batch_syn, derive_seed(cfg.seed, "mtt-iter", it),
                         augment=self.augment is not None)
        return meta_gradient(self.flat, theta_start.to(images), theta_target.to(images), images, self.labels.detach(),
                             self.log_lr.detach(), plan, self.augment, mode=cfg.mode, engine=cfg.engine)

    def apply(self, res: MetaGrad) -> IterationLog:
        """Step the optimisers with a meta-gradient (from :meth:`compute` or a batched computation, see
        :mod:`fedlatent.distill.batched`): zero grads, ``synthetic.backward(dX)``, ``d log_lr`` (and the soft
        labels' gradient), optimiser steps. A non-finite result restores the set, lr, labels and optimiser
        states to their last good values and raises :class:`DivergedError`."""
        it = self.it
        saved = [p.detach().clone() for p in self._params()]
        opt_states = [{k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                       for k, v in o.state.items()} for o in self._optimizers()]
        for o in self._optimizers():
            o.zero_grad(set_to_none=True)
        self.synthetic.backward(res.grad_images)
        self.log_lr.grad = res.grad_log_lr.reshape(()).to(self.log_lr)
        if self.soft:
            self.labels.grad = res.grad_labels.to(self.labels)
        for o in self._optimizers():
            o.step()
        if not all(torch.isfinite(p).all() for p in self._params()):
            with torch.no_grad():
                for p, s in zip(self._params(), saved):
                    p.copy_(s)
            for o, st in zip(self._optimizers(), opt_states):
                o.state.clear()
                o.state.update(st)
            raise DivergedError(f"iteration {it}: the update made the synthetic set non-finite (lower lr_img); "
                                "restored the last good set")
        log = IterationLog(it, res.loss, self.lr, res.param_dist)
        self.history.append(log)
        self.it += 1
        return log

    def step(self) -> IterationLog:
        """One MTT iteration, ``apply(compute())``. On a non-finite loss, gradient or update the synthetic set,
        lr and labels are restored to their last good values and a :class:`DivergedError` is raised."""
        return self.apply(self.compute())

    def run(self, iterations: int, progress: bool = True, callback: Callable[[IterationLog], None] | None = None,
            *, desc: str | None = None, postfix: Callable[[IterationLog], dict | None] | None = None,
            stop_on_divergence: bool = False) -> list[IterationLog]:
        """``iterations`` calls of :meth:`step` under a progress bar: the one iteration loop of every MTT engine
        (pixel MTT, DynaFed's synthesis, FedDGM's looped clients).

        ``postfix(log)`` gives the bar's postfix (default: loss and lr; None leaves it). With
        ``stop_on_divergence`` a :class:`DivergedError` ends the loop instead of propagating: the set keeps its
        last good state and :attr:`failure` says where (``"iteration IT: ..."``); other errors propagate.
        """
        from tqdm import tqdm

        self.failure = None
        bar = tqdm(range(iterations), desc=desc or f"MTT ({self.config.mode}, {self.kernel_name})",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for _ in bar:
            try:
                log = self.step()
            except FedLatentError as e:
                if not (stop_on_divergence and is_diverged(e)):
                    raise
                self.failure = f"iteration {self.it}: {e}"
                break
            shown = postfix(log) if postfix is not None else {"loss": f"{log.loss:.4f}", "lr": f"{log.lr:.2e}"}
            if shown:
                bar.set_postfix(**shown)
            if callback is not None:
                callback(log)
        bar.close()
        return self.history

    def state(self) -> dict:
        return {"config": asdict(self.config), "lr": self.lr, "iterations": self.it,
                "loss_history": [h.loss for h in self.history], "kernel": self.kernel_name}


__all__ = ["DistillConfig", "TrajectorySampler", "Distiller", "IterationLog"]
