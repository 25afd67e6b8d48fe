"""The round engine shared by the simulation (:func:`fedlatent.fl.simulation.run_simulation`, serial or Ray)
and the Flower strategy (:class:`fedlatent.flower.strategy.FedLatentStrategy`).

What happens to a round's replies is written once here: clients that failed (logged, recorded, fatal when
none returned), byte accounting (downlink = the payloads sent, uplink = the tensors received), upload
screening (:func:`fedlatent.fl.validate.validate_uploads`), the method's ``aggregate``, the sample-weighted
training loss, the totals, the metrics row, the run folder's metrics.csv and accuracy.png (throttled), and the
outcome (final / best accuracy, summary.json). Who runs the clients and when the evaluation happens is the
caller's business.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

import numpy as np

from ..train import evaluate
from .base import FLConfig, FLContext, Strategy, Upload
from .run import RunFolder, iter_rows
from .validate import Rejection, validate_uploads

log = logging.getLogger("fedlatent.fl")

PLOT_INTERVAL_S = 10.0  # accuracy.png is refreshed at most this often during a run (and at the end)


def upload_bytes(upload: object) -> int:
    """Bytes of an upload's tensors (0 for anything that is not an Upload)."""
    if isinstance(upload, Upload) and isinstance(upload.tensors, Mapping):
        return int(sum(t.numel() * t.element_size() for t in upload.tensors.values() if isinstance(t, torch.Tensor)))
    return 0


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a downlink payload."""
    return int(sum(t.numel() * t.element_size() for t in payload.values()))


def evaluate_all(strategy: Strategy, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Evaluate ``strategy.eval_model()``: one model, or a dict name -> model or list of models.

    For a dict, ``accuracy_<name>`` / ``loss_<name>`` are written per entry (the mean over the entry's
    models for a list, e.g. FedMD's parties of one architecture) and the headline ``accuracy`` / ``loss``
    is the mean over all evaluated models.
    """
    models = strategy.eval_model()
    if isinstance(models, Mapping):
        row: dict[str, float] = {}
        accs: list[float] = []
        losses: list[float] = []
        for name, m in models.items():
            group = list(m) if isinstance(m, (list, tuple)) else [m]
            if not group:
                continue
            rs = [evaluate(g, x, y, batch_size) for g in group]
            row[f"accuracy_{name}"] = float(np.mean([r["accuracy"] for r in rs]))
            row[f"loss_{name}"] = float(np.mean([r["loss"] for r in rs]))
            accs += [r["accuracy"] for r in rs]
            losses += [r["loss"] for r in rs]
        # Heterogeneous methods: the headline numbers are the mean over the evaluated models.
        row["accuracy"], row["loss"] = float(np.mean(accs)), float(np.mean(losses))
        return row
    return evaluate(models, x, y, batch_size)



@dataclass
class RoundOutcome:
    """What :meth:`RunState.aggregate_round` made of a round's replies (the row columns before evaluation)."""

    accepted: list[Upload]
    rejected: list[Rejection]
    failed: int
    extra: dict[str, Any]
    up: int
    down: int
    train_loss: float | None


@dataclass
class RunState:
    """A run's bookkeeping: history rows, rejections, failures, byte totals, the run folder and its plot."""

    strategy: Strategy
    cfg: FLConfig
    ctx: FLContext
    run: RunFolder | None = None
    t_start: float = field(default_factory=time.perf_counter)
    history: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0, "rejected": 0})
    last_plot: float = -math.inf
    tracker: Any = None  # fedlatent.tracking.open_trackers: every recorded row goes there too

    # -- a round ---------------------------------------------------------------------------------------
    def aggregate_round(self, rnd: int, selected: Sequence[int], ids: Sequence[int], uploads: list,
                        references: Mapping[int, Mapping[str, torch.Tensor]],
                        failed: Sequence[tuple[int, str, int]] = (),
                        malformed: Sequence[Rejection] | None = None) -> RoundOutcome:
        """Failures, bytes, screening, ``strategy.aggregate`` and the training loss of round ``rnd``.

        ``selected``: the round's clients; ``ids[i]`` the client of ``uploads[i]`` (those that returned);
        ``references``: the payload sent to each selected client; ``failed``: ``(client, error, attempts)`` of
        the clients that did not return; ``malformed``: replies rejected before screening (Flower), merged into
        the rejections in client order.
        """
        for cid, err, attempts in failed:
            log.warning("round %d: client %d failed after %d attempt(s) (%s); the round goes on without it",
                        rnd, cid, attempts, err)
        for r in malformed or ():
            log.warning("round %d: rejected upload of client %d: %s", rnd, r.client_id, r.reason)
        self.failures.extend({"round": rnd, "client": cid, "attempts": attempts, "error": err}
                             for cid, err, attempts in failed)
        if failed and len(failed) == len(selected):
            from ..errors import FedLatentError

            raise FedLatentError(f"round {rnd}: no client returned ({len(failed)} failed; first error: {failed[0][1]})")
        down = sum(payload_bytes(p) for p in references.values())
        up = sum(upload_bytes(u) for u in uploads)
        accepted, rejected = validate_uploads(
            uploads, list(ids), self.strategy.expected_upload, references={c: references[c] for c in ids},
            client_sizes=self.ctx.client_sizes, norm_factor=self.cfg.norm_factor, norm_cap=self.cfg.norm_cap, rnd=rnd)
        if malformed is not None:
            rejected = sorted(list(malformed) + rejected, key=lambda r: list(selected).index(r.client_id))
        self.rejections.extend({"round": rnd, "client": r.client_id, "reason": r.reason} for r in rejected)
        extra: dict[str, Any] = {}
        if accepted:
            extra = dict(self.strategy.aggregate(rnd, accepted) or {})
        else:
            log.warning("round %d: every upload was rejected; the global state is unchanged", rnd)
        if getattr(self.cfg, "dp", False):  # per-client privacy accounting columns (fedlatent.privacy.dp)
            from ..privacy.dp import round_columns

            extra.update(round_columns(self.cfg, self.ctx.client_sizes, rnd, accepted))
        losses = [(u.metrics.get("train_loss"), u.num_samples) for u in accepted]
        losses = [(float(v), n) for v, n in losses if isinstance(v, (int, float)) and math.isfinite(v)]
        train_loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None
        self.totals["up"] += up
        self.totals["down"] += down
        self.totals["rejected"] += len(rejected)
        return RoundOutcome(accepted, rejected, len(failed), extra, up, down, train_loss)

    def round_row(self, rnd: int, selected: Sequence[int], o: RoundOutcome, ev: Mapping[str, Any],
                  t_round: float) -> dict[str, Any]:
        """The metrics.csv row of round ``rnd`` (``ev``: the evaluation, empty when none ran)."""
        now = time.perf_counter()
        return {"round": rnd, "accuracy": ev.get("accuracy"), "loss": ev.get("loss"), "clients": len(selected),
                "client_ids": " ".join(map(str, selected)), "accepted": len(o.accepted), "rejected": len(o.rejected),
                "failed": o.failed, "train_loss": o.train_loss, "uplink_bytes": o.up, "downlink_bytes": o.down,
                "round_s": now - t_round, "wall_s": now - self.t_start,
                **{k: v for k, v in ev.items() if k not in ("accuracy", "loss")}, **o.extra}

    def initial_row(self, ev: Mapping[str, Any]) -> dict[str, Any]:
        """Round 0: the evaluation of the initial model."""
        return {"round": 0, **ev, "clients": 0, "client_ids": "", "accepted": 0, "rejected": 0, "failed": 0,
                "uplink_bytes": 0, "downlink_bytes": 0, "round_s": 0.0, "wall_s": time.perf_counter() - self.t_start}

    def record(self, row: dict[str, Any], final: bool) -> None:
        """Append ``row`` to the history and the run folder's metrics.csv; redraw accuracy.png at most every
        :data:`PLOT_INTERVAL_S` seconds, and at the end."""
        self.history.append(row)
        if self.tracker is not None:
            self.tracker.log_metrics(row, step=int(row["round"]))
        if self.run is not None:
            plot = row.get("accuracy") is not None and (final or time.perf_counter() - self.last_plot >= PLOT_INTERVAL_S)
            self.run.log_round(row, label=self.strategy.name, plot=plot)
            if plot:
                self.last_plot = time.perf_counter()

    # -- the outcome -----------------------------------------------------------------------------------
    def outcome(self) -> dict[str, Any]:
        """final_accuracy, best_accuracy, best_round and final_by_model (``accuracy_<name>`` of the last
        evaluation) of the history; FedLatentError when nothing was evaluated."""
        accs = [(int(r["round"]), float(r["accuracy"])) for r in self.history if r.get("accuracy") is not None]
        if not accs:
            from ..errors import FedLatentError

            raise FedLatentError("the run recorded no evaluation")
        best_round, best = max(accs, key=lambda t: (t[1], -t[0]))
        last_eval = next(r for r in reversed(self.history) if r.get("accuracy") is not None)
        final_by_model = {k[len("accuracy_"):]: float(v) for k, v in last_eval.items()
                          if k.startswith("accuracy_") and v is not None}
        return {"final_accuracy": accs[-1][1], "best_accuracy": best, "best_round": best_round,
                "final_by_model": final_by_model}

    def write_summary(self, summary: dict[str, Any], **more: Any) -> None:
        """model.safetensors (the final global model) and summary.json: ``summary`` plus the final loss, the client
        sizes and ``more``."""
        if self.run is None:
            return
        summary["final_loss"] = iter_rows(self.history, "loss")[-1]
        summary["client_sizes"] = list(self.ctx.client_sizes)
        summary.update(more)
        from ..privacy.model_io import save_global_model

        save_global_model(self.run.path, self.strategy)  # model.safetensors (the audits attack it); before summary.json
        self.run.write_summary(summary)


__all__ = ["PLOT_INTERVAL_S", "evaluate_all", "RunState", "RoundOutcome", "upload_bytes", "payload_bytes"]
