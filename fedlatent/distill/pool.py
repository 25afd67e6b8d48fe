"""FedDGM's server side of per-client distillation: one client's distilled set, the pooled sets with provenance,
and the round's bookkeeping (which sets are dropped, the losses and lrs of the round)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import FedLatentError
from .batched import ClientRun
from .distiller import Distiller

log = logging.getLogger("fedlatent.fl.feddgm")


@dataclass
class DistilledSet:
    """One client's distilled set as the server pools it (rendered images on the CPU, float32) - also what a
    parallel worker returns for :meth:`fedlatent.fl.methods.feddgm.FedDGM.distill_client`. ``images`` is None
    when the work failed."""

    run: ClientRun
    images: torch.Tensor | None
    labels: torch.Tensor | None
    ws: torch.Tensor | None = None
    f_k: torch.Tensor | None = None


def harvest(d: Distiller, run: ClientRun, pixel: bool) -> DistilledSet:
    """Render a finished distiller's set (and, in a latent space, keep its w+ codes and f_k features)."""
    syn = d.synthetic
    x = syn.render().detach().float()
    ws = f_k = None
    if not pixel:
        fw = syn.full_ws()
        ws = None if fw is None else fw.detach().float().cpu()
        f_k = None if syn.f is None else syn.f.detach().float().cpu()
    y = d.labels.detach()
    y = y.float() if y.dtype.is_floating_point else y.long()  # soft-label logits [N, K] or class indices [N]
    return DistilledSet(run, x.cpu(), y.cpu(), ws, f_k)


@dataclass
class Pool:
    """The pooled distilled set (server side) with provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    clients: torch.Tensor
    rounds: torch.Tensor
    ws: torch.Tensor | None = None
    f_k: torch.Tensor | None = None

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_state(cls, st: Mapping[str, Any] | None) -> "Pool | None":
        return None if not st else cls(**{k: v.clone() for k, v in st.items()})

    @staticmethod
    def cat(pools: Sequence["Pool"]) -> "Pool":
        def c(name):
            ts = [getattr(p, name) for p in pools]
            return None if any(t is None for t in ts) else torch.cat(ts)

        return Pool(c("images"), c("labels"), c("clients"), c("rounds"), c("ws"), c("f_k"))


def map_distillation(distill_map: Callable, job: Callable, rnd: int, client_ids: Sequence[int],
                     uploads: Sequence[Any]) -> list[DistilledSet]:
    """Every client's ``job(rnd, upload)`` through a parallel runner ``distill_map``; a job the runner reports as
    failed (a :class:`fedlatent.fl.base.ClientFailure`) becomes a set without images (dropped and logged by
    :func:`pool_round`). When every job failed - errors, not diverged sets - FedLatentError is raised with the
    first error (going on would repeat rounds that change nothing)."""
    out, errors = [], []
    for cid, res in zip(client_ids, distill_map(job, [(rnd, u) for u in uploads])):
        if isinstance(res, DistilledSet):
            out.append(res)
        else:
            err = getattr(res, "error", None) or repr(res)
            errors.append((cid, err))
            out.append(DistilledSet(ClientRun(cid, failure=f"job failed: {err}"), None, None))
    if errors and len(errors) == len(uploads):
        cid, err = errors[0]
        raise FedLatentError(f"round {rnd}: every distillation job failed ({len(errors)} of {len(uploads)}); "
                             f"first error (client {cid}): {err}")
    return out


def pool_round(sets: Sequence[DistilledSet], client_ids: Sequence[int], rnd: int) -> tuple[Pool | None, set[int]]:
    """This round's pool of the usable sets, and the clients whose set was dropped (failed, or images not finite);
    None when no set is usable (logged)."""
    parts, dropped = [], set()
    for cid, st in zip(client_ids, sets):
        if st.images is None:
            log.warning("round %d: the distillation of client %d failed (%s); its set is dropped",
                        rnd, cid, st.run.failure)
            dropped.add(cid)
            continue
        if not torch.isfinite(st.images).all():
            log.warning("round %d: client %d's distilled images are not finite (%s); its set is dropped",
                        rnd, cid, st.run.failure)
            dropped.add(cid)
            continue
        n = st.images.shape[0]
        parts.append(Pool(st.images, st.labels, torch.full((n,), cid, dtype=torch.long),
                          torch.full((n,), rnd, dtype=torch.long), st.ws, st.f_k))
    if not parts:
        lost = sum(st.images is None for st in sets)
        log.warning("round %d: no usable distilled set (%d diverged%s); the global state is unchanged", rnd,
                    len(sets) - lost, f", {lost} failed" if lost else "")
        return None, dropped
    return Pool.cat(parts), dropped


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def round_record(runs: Sequence[ClientRun], rnd: int, batch: int, dropped: set[int]) -> tuple[dict, dict]:
    """(the round's log entry, its metrics: distill_loss (last iteration), distill_loss_first, syn_lr,
    distill_failed); a client that stopped early but kept its last good set is logged here."""
    final_losses = [r.losses[-1] for r in runs if r.losses]
    first_losses = [r.losses[0] for r in runs if r.losses]
    failures = [r for r in runs if r.failure]
    for r in failures:
        if r.client_id not in dropped:  # a dropped set was logged by pool_round
            log.warning("round %d: distillation of client %d stopped at %s; its last good set is used",
                        rnd, r.client_id, r.failure)
    entry = {"round": rnd, "clients": [r.client_id for r in runs], "loss_first": first_losses,
             "loss_last": final_losses, "lr": [r.lr if math.isfinite(r.lr) else None for r in runs],
             "failures": [r.failure for r in runs], "batch": batch}
    metrics = {"distill_loss": float(np.mean(final_losses)) if final_losses else math.nan,
               "distill_loss_first": float(np.mean(first_losses)) if first_losses else math.nan,
               "syn_lr": _finite_mean([r.lr for r in runs]), "distill_failed": float(len(failures))}
    return entry, metrics


__all__ = ["DistilledSet", "harvest", "Pool", "map_distillation", "pool_round", "round_record"]
