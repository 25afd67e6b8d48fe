"""The premise check of a FedDGM run: does the distilled pool beat its own starting point?

Three sets of the same size train a fresh network each (:func:`fedlatent.distill.pixels.evaluate_synthetic`, the
MTT evaluation protocol) and are tested on the real test set:

(a) the distilled pool (the last round's, or all rounds' with ``pool="all"``);
(b) the raw generator samples at the *initial* latents of the same clients and rounds, the same labels, no MTT
    (re-created from the seeds, :meth:`fedlatent.fl.methods.feddgm.FedDGM.initial_synthetic`; under ``warm_start``
    the fresh draw each client's chain of sets began from, :meth:`~fedlatent.fl.methods.feddgm.FedDGM.origin_round`);
(c) a random real subset of the same size, class-balanced (a reference only a simulation can compute: the
    server never holds real client data).

It also reports how far the latents moved, ``||f_T - f_0|| / ||f_0||`` and ``||w_T - w_0|| / ||w_0||``
(Frobenius norms over the pool; images in pixel space), and the matching loss (MTT eq. 2) of the first and the
last iteration, averaged over the clients of the pool's last round. Distillation is worth its cost when (a) > (b).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import FedLatentError
from ..utils import class_indices


@dataclass
class Premise:
    """Outcome of :func:`premise_check` (accuracies as fractions, mean and std over ``seeds``)."""

    arch: str
    n_images: int
    distilled: dict
    initial: dict
    real: dict | None
    f_move: float | None
    w_move: float | None
    loss_first: float
    loss_last: float
    epochs: int

    @property
    def holds(self) -> bool:
        """The distilled pool trains a better network than the raw samples it started from."""
        return self.distilled["mean"] > self.initial["mean"]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"holds": self.holds}

    def markdown(self) -> str:
        def acc(r):
            return "-" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"

        def num(v, spec=".4f"):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

        seeds = len(self.distilled["accs"])
        lines = ["## Premise check", "",
                 f"A fresh `{self.arch}` trained on each set of {self.n_images} images ({self.epochs} epochs, DSA, "
                 f"{seeds} seed{'s' if seeds > 1 else ''}), real test accuracy (%):", "",
                 "| set | accuracy |", "|---|---:|",
                 f"| (a) distilled pool | {acc(self.distilled)} |",
                 f"| (b) generator samples at the initial latents (no MTT) | {acc(self.initial)} |",
                 f"| (c) random real subset (reference: needs the clients' data) | {acc(self.real)} |", "",
                 f"- latents moved: ‖Δf‖/‖f‖ = {num(self.f_move)}, ‖Δw‖/‖w‖ = {num(self.w_move)}",
                 f"- matching loss (last round, mean over clients): first iteration {num(self.loss_first)}, last "
                 f"{num(self.loss_last)}",
                 f"- **the premise {'holds' if self.holds else 'fails'}**: distillation "
                 f"{'beats' if self.holds else 'does not beat'} its own initialisation "
                 f"({100 * (self.distilled['mean'] - self.initial['mean']):+.2f} points)", ""]
        return "\n".join(lines)


def _rel(new: torch.Tensor | None, old: torch.Tensor | None) -> float | None:
    if new is None or old is None:
        return None
    den = float(old.double().norm())
    return float((new.double() - old.double()).norm()) / den if den > 0 else math.nan


@torch.no_grad()
def initial_pool(strategy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Images, class labels, w+ codes and f_k of the pool's sets *before* MTT (re-created from the seeds, in pool
    order)."""
    pool = strategy.pool
    imgs, labels, ws, fs = [], [], [], []
    keys = list(dict.fromkeys(zip(pool.rounds.tolist(), pool.clients.tolist())))
    hard = class_indices(pool.labels)
    for rnd, cid in keys:  # classes="inferred": each set's own classes, as the pool holds them
        own = hard[(pool.rounds == rnd) & (pool.clients == cid)] if strategy.classes == "inferred" else None
        start = strategy.origin_round(int(rnd), int(cid)) if hasattr(strategy, "origin_round") else int(rnd)
        syn, y, _ = strategy.initial_synthetic(start, int(cid), own)  # warm_start: its chain's fresh draw
        imgs.append(syn.render().detach().float().cpu())
        labels.append(class_indices(y).long().cpu())
        fw = syn.full_ws() if hasattr(syn, "full_ws") else None
        ws.append(None if fw is None else fw.detach().float().cpu())
        f = getattr(syn, "f", None)
        fs.append(None if f is None else f.detach().float().cpu())
    cat = (lambda ts: None if any(t is None for t in ts) else torch.cat(ts))  # noqa: E731
    x0 = torch.cat(imgs)
    if x0.shape != pool.images.shape:
        raise FedLatentError(f"premise check: re-created initial sets have shape {tuple(x0.shape)}, the pool "
                             f"{tuple(pool.images.shape)}")
    return x0, torch.cat(labels), cat(ws), cat(fs)


def premise_check(strategy, data, *, arch: str | None = None, epochs: int = 300, seeds=(0,), real: bool = True,
                  max_test: int | None = None, progress: bool = False) -> Premise:
    """Run the premise check on a FedDGM strategy after its rounds (``strategy.pool`` set) and its data.

    ``arch``: the network trained on each set (default: the run's global model spec).
    """
    from ..distill.pixels import evaluate_synthetic
    from ..evaluate import real_subset

    pool = strategy.pool
    if pool is None or len(pool.images) == 0:
        raise FedLatentError("premise check: the run has no distilled pool (no round distilled a usable set)")
    arch = arch or strategy.ctx.config.model
    x0, y0, w0, f0 = initial_pool(strategy)
    kw = dict(epochs=epochs, seeds=tuple(seeds), progress=progress, max_test=max_test)
    distilled = evaluate_synthetic(pool.images, pool.labels, arch, data, **kw)  # soft labels when learned
    initial = evaluate_synthetic(x0, y0, arch, data, **kw)
    ref = None
    if real:
        per_class = max(1, len(pool.images) // data.num_classes)
        xr, yr = real_subset(data, per_class, int(strategy.ctx.config.seed))
        ref = evaluate_synthetic(xr, yr, arch, data, **kw)
    pixel = pool.f_k is None and pool.ws is None
    last = strategy.round_log[-1] if strategy.round_log else {}
    mean = (lambda v: float(sum(v) / len(v)) if v else math.nan)  # noqa: E731
    return Premise(arch=arch, n_images=int(len(pool.images)), distilled=distilled, initial=initial, real=ref,
                   f_move=_rel(pool.images, x0) if pixel else _rel(pool.f_k, f0), w_move=_rel(pool.ws, w0),
                   loss_first=mean(last.get("loss_first")), loss_last=mean(last.get("loss_last")), epochs=epochs)


__all__ = ["Premise", "premise_check", "initial_pool"]
