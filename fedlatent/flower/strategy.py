"""A Flower Message-API strategy (``flwr.serverapp.strategy.Strategy``) that runs any stateless fedlatent method.

:class:`FedLatentStrategy` wraps a :class:`fedlatent.fl.base.Strategy` (FedDGM, DynaFed, FedAvg, FedProx) and
drives it the way :func:`fedlatent.fl.simulation.run_simulation` does, with Flower carrying the messages:

* **Who is who.** Before round 1 the strategy waits until ``clients`` SuperNodes are connected (Flower's
  ``min_available_nodes`` pitfall: round 1 must see the whole cohort) and asks every node, with a ``query``
  message, for its ``partition-id`` (node config) and sample count. Node ids are random; partition ids are the
  fedlatent client ids. Missing, duplicated or out-of-range partitions stop the run with a clear error.
* **Sampling.** Round ``r`` trains exactly the engine's clients, :func:`fedlatent.fl.simulation.client_schedule`
  (seeded per round, independent of the method), mapped to their node ids; Flower's unseeded
  ``random.sample`` is never used.
* **configure_train** sends every selected client its ``strategy.client_payload`` (FedDGM: the flat surrogate
  parameters) as an ArrayRecord, and the round, client id and run spec as a ConfigRecord.
* **aggregate_train** decodes the replies into :class:`~fedlatent.fl.base.Upload`, screens them with
  :func:`fedlatent.fl.validate.validate_uploads` (a client error or a missing reply is a rejection too) and
  calls ``strategy.aggregate`` - for FedDGM / DynaFed that is where the server-side distillation runs. It
  returns the global model as an ArrayRecord and the round's scalar metrics.
* **Evaluation** is centralised: ``evaluate_fn`` evaluates ``strategy.eval_model()`` on the test set at round 0,
  every ``eval_every`` rounds and at the last round. No federated evaluation messages are sent. A user's own
  ``evaluate_fn`` (``start(..., evaluate_fn=...)``) runs after it every round, as in Flower; its metrics are
  added to the round's history row and to Flower's result (a metric of the same name, e.g. ``accuracy``,
  replaces fedlatent's).

:attr:`FedLatentStrategy.history` holds the same rows as the engine's ``metrics.csv`` (round, accuracy, loss,
clients, client_ids, accepted, rejected, train_loss, uplink/downlink bytes, timings and the method's extras);
:meth:`FedLatentStrategy.result` packs them into a :class:`FlowerSimulationResult`.
"""
from __future__ import annotations

from . import require_flwr

require_flwr()

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy as FlowerStrategy
from torch import nn

from ..fl.base import Strategy, Upload
from ..fl.engine import RunState, evaluate_all
from ..fl.run import RunFolder
from ..fl.simulation import SimulationResult, client_schedule, resolve_device
from ..fl.validate import Rejection
from ..utils import FedLatentError
from .messages import ARRAYS, CONFIG, content_to_upload, tensors_to_record
from .spec import RunSpec, check_supported, finite_metrics, make_context

log = logging.getLogger("fedlatent.flower")


@dataclass
class FlowerSimulationResult(SimulationResult):
    """:class:`~fedlatent.fl.simulation.SimulationResult` of a Flower run, plus Flower's own record.

    ``nodes``: client (partition) id -> Flower node id; ``flower``: the :class:`flwr.serverapp.strategy.Result`
    returned by ``Strategy.start``; ``distilled``: the exported distilled / pseudo set (run folder only);
    ``connect_s``: seconds from the strategy's start until every client had answered the partition query;
    ``total_s``: the whole call of :func:`fedlatent.flower.run_simulation`, Ray start and stop included (None
    elsewhere). ``wall_s`` (and the history's) counts from round 0, as the engine's.
    """

    nodes: dict[int, int] = field(default_factory=dict)
    flower: Any = None
    distilled: Path | None = None
    connect_s: float | None = None
    total_s: float | None = None


class FedLatentStrategy(FlowerStrategy):
    """A Flower strategy around a fedlatent Strategy (see the module docstring).

    The fedlatent Strategy is built from ``spec`` (as every client builds its own); ``data``: the server's
    :class:`~fedlatent.data.ImageData` (test set + normalisation; its training set is not used); ``out``: optional
    run folder (config.json, metrics.csv, accuracy.png, summary.json and the
    method's artefacts, e.g. FedDGM's distilled.safetensors); ``wait_nodes``: seconds to wait for the cohort.
    """

    def __init__(self, spec: RunSpec, data, *, out: str | Path | None = None, overwrite: bool = False,
                 wait_nodes: float = 300.0, progress: bool = False):
        self.spec = spec
        self.cfg = spec.fl_config()
        self.strategy: Strategy = spec.build_strategy()
        check_supported(self.strategy, self.cfg)
        if hasattr(self.strategy, "progress"):  # FedDGM / DynaFed progress bars of the server-side distillation
            self.strategy.progress = bool(progress)
        self.t_start = time.perf_counter()
        self.device = resolve_device(self.cfg.device)
        self.wait_nodes = float(wait_nodes)
        self.spec_json = spec.to_json()
        self.schedule = client_schedule(self.cfg.clients, self.cfg.rounds, self.cfg.participation, self.cfg.seed)
        self.run = None
        if out is not None:
            RunFolder.check(out, overwrite)
            self.run = RunFolder(out, overwrite=overwrite)
        self.ctx = make_context(spec, data, [], str(self.device))  # client sizes arrive with the nodes
        self.ctx.run_dir = str(self.run.path) if self.run is not None else None
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        self.data_info = {"name": data.name, "source": data.source, "channels": data.channels,
                          "image_size": data.image_size, "num_classes": data.num_classes,
                          "test": int(len(data.y_test))}
        self.strategy.setup(self.ctx)
        self.nodes: dict[int, int] | None = None
        # the engine's bookkeeping (rows, rejections, failures, totals, metrics.csv): fedlatent.fl.engine
        self.state = RunState(self.strategy, self.cfg, self.ctx, self.run, self.t_start)
        self._round: dict[str, Any] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self.flower_result: Result | None = None
        self.connect_s: float | None = None

    history = property(lambda self: self.state.history)
    rejections = property(lambda self: self.state.rejections)
    failures = property(lambda self: self.state.failures)
    totals = property(lambda self: self.state.totals)

    # -- Flower Strategy API --------------------------------------------------------------------------
    def summary(self) -> None:
        log.info("fedlatent %s over Flower: %d clients, %d rounds, participation %s, seed %d", self.strategy.name,
                 self.cfg.clients, self.cfg.rounds, self.cfg.participation, self.cfg.seed)

    def initial_arrays(self) -> ArrayRecord:
        """The global model as an ArrayRecord (empty for a dict of models)."""
        m = self.strategy.eval_model()
        return tensors_to_record(m.state_dict()) if isinstance(m, nn.Module) else ArrayRecord()

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Connect to the cohort, then Flower's round loop; defaults: the run's rounds and central evaluation.

        ``evaluate_fn`` (Flower's signature, called at round 0 and after every round with the global arrays) does
        not replace the bookkeeping: fedlatent's central evaluation still records the history, and the metrics
        the function returns are merged into each row (see :meth:`evaluate`)."""
        if num_rounds is not None and num_rounds != self.cfg.rounds:
            raise FedLatentError(f"num_rounds {num_rounds} != the run's rounds {self.cfg.rounds} (set `rounds`)")
        t0 = time.perf_counter()
        self.connect(grid, timeout=timeout)
        self.connect_s = time.perf_counter() - t0
        self.t_start = self.state.t_start = time.perf_counter()
        if self.run is not None:
            self._write_config()
        res = super().start(grid, self.initial_arrays() if initial_arrays is None else initial_arrays,
                            num_rounds=self.cfg.rounds, timeout=timeout, train_config=train_config,
                            evaluate_config=evaluate_config,
                            evaluate_fn=lambda rnd, arrays: self.evaluate(rnd, arrays, user_fn=evaluate_fn))
        self.flower_result = res
        return res

    def connect(self, grid: Grid, timeout: float = 3600) -> dict[int, int]:
        """Wait for ``clients`` nodes, ask each for its partition id; returns client id -> node id."""
        if self.nodes is not None:
            return self.nodes
        k = self.cfg.clients
        deadline = time.monotonic() + self.wait_nodes
        while len(ids := sorted(int(n) for n in grid.get_node_ids())) < k:
            if time.monotonic() > deadline:
                raise FedLatentError(f"only {len(ids)} of {k} SuperNodes connected after {self.wait_nodes:g} s; "
                                     f"start one SuperNode per client (simulation: num-supernodes = {k})")
            time.sleep(0.2)
        msgs = [Message(RecordDict({CONFIG: ConfigRecord({"spec": self.spec_json})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in ids]
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        nodes: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for r in sorted(replies, key=lambda m: m.metadata.src_node_id):
            src = int(r.metadata.src_node_id)
            if r.has_error():
                raise FedLatentError(f"SuperNode {src} failed to load its data: {_reason(r)}")
            c = r.content[CONFIG]
            pid, parts, n = int(c["partition-id"]), int(c["num-partitions"]), int(c["num-examples"])
            if parts != k:
                raise FedLatentError(f"SuperNode {src} has num-partitions={parts}, but the run has {k} clients "
                                     f"(one SuperNode per client: num-supernodes / --node-config num-partitions={k})")
            if not 0 <= pid < k:
                raise FedLatentError(f"SuperNode {src} has partition-id={pid}, outside 0..{k - 1}")
            if pid in nodes:
                raise FedLatentError(f"partition-id {pid} is used by two SuperNodes ({nodes[pid]} and {src})")
            nodes[pid], sizes[pid] = src, n
        missing = sorted(set(range(k)) - set(nodes))
        if missing:
            raise FedLatentError(f"no SuperNode answered for partition(s) {missing} "
                                 f"({len(replies)} of {len(ids)} nodes replied)")
        self.ctx.client_sizes[:] = [sizes[c] for c in range(k)]
        self.nodes = nodes
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Messages for the round's scheduled clients, each with its own ``client_payload``."""
        nodes = self.connect(grid)
        rnd = int(server_round)
        if not 1 <= rnd <= len(self.schedule):
            raise FedLatentError(f"round {rnd} is outside the run's {len(self.schedule)} rounds")
        selected = [int(c) for c in self.schedule[rnd - 1]]
        refs: dict[int, dict[str, torch.Tensor]] = {}
        msgs = []
        extra = {k: v for k, v in config.items() if k not in ("server-round", "client-id", "spec")}
        for cid in selected:
            payload = self.strategy.client_payload(rnd, cid)
            refs[cid] = payload
            cfg = ConfigRecord({**extra, "server-round": rnd, "client-id": cid, "spec": self.spec_json})
            msgs.append(Message(RecordDict({ARRAYS: tensors_to_record(payload), CONFIG: cfg}),
                                dst_node_id=nodes[cid], message_type=MessageType.TRAIN))
        self._round = {"round": rnd, "t0": time.perf_counter(), "selected": selected, "refs": refs}
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, screen and aggregate the replies with the fedlatent strategy (server distillation runs here)."""
        rnd = int(server_round)
        if self._round.get("round") != rnd:
            raise FedLatentError(f"aggregate_train({rnd}) without configure_train({rnd})")
        selected, refs = self._round["selected"], self._round["refs"]
        by_node: dict[int, Message] = {}
        for m in replies:
            by_node.setdefault(int(m.metadata.src_node_id), m)
        uploads: list[Upload] = []
        ids: list[int] = []
        failed: list[tuple[int, str]] = []       # no usable reply: left out of the round (engine: ClientFailure)
        malformed: list[Rejection] = []          # a reply that is not an upload: rejected like a bad upload
        for cid in selected:
            m = by_node.get(self.nodes[cid])
            if m is None:
                failed.append((cid, "no reply (timeout)"))
            elif m.has_error():
                failed.append((cid, f"client error: {_reason(m)}"))
            else:
                try:
                    uploads.append(content_to_upload(m.content, self.device))
                    ids.append(cid)
                except FedLatentError as e:
                    malformed.append(Rejection(cid, f"malformed reply: {e}"))
        o = self.state.aggregate_round(rnd, selected, ids, uploads, refs, [(cid, why, 1) for cid, why in failed],
                                       malformed=malformed)
        self._pending[rnd] = {"outcome": o, "selected": selected, "t0": self._round["t0"]}
        self._round = {}
        metrics = finite_metrics({"accepted": len(o.accepted), "rejected": len(o.rejected), "failed": o.failed,
                                  "uplink_bytes": o.up, "downlink_bytes": o.down,
                                  **({"train_loss": o.train_loss} if o.train_loss is not None else {}), **o.extra})
        return self.initial_arrays(), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated centrally (:meth:`evaluate`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # -- central evaluation and the history --------------------------------------------------------------
    def evaluate(self, server_round: int, arrays: ArrayRecord | None = None,
                 user_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate the global model (round 0, every ``eval_every``, the last round)
        and record the round's row; the arrays are ignored (the strategy holds the model).

        ``user_fn``: a user's ``evaluate_fn``, called every round with ``arrays``; its scalar metrics are
        merged into the row (over fedlatent's, e.g. its ``accuracy``) and the returned record. Names of the
        row's bookkeeping columns (round, clients, accepted, uplink_bytes, ...) raise :class:`FedLatentError`."""
        rnd = int(server_round)
        if rnd == 0:
            ev = evaluate_all(self.strategy, self.x_test, self.y_test, self.cfg.eval_batch_size)
            ev, record = self._with_user_metrics(ev, user_fn, rnd, arrays)
            self.state.record(self.state.initial_row(ev), final=self.cfg.rounds == 0)
            return record
        p = self._pending.pop(rnd)
        final = rnd == self.cfg.rounds
        ev = (evaluate_all(self.strategy, self.x_test, self.y_test, self.cfg.eval_batch_size)
              if final or rnd % self.cfg.eval_every == 0 else {})
        ev, record = self._with_user_metrics(ev, user_fn, rnd, arrays)
        self.state.record(self.state.round_row(rnd, p["selected"], p["outcome"], ev, p["t0"]), final)
        return record

    _BOOKKEEPING = frozenset({"round", "clients", "client_ids", "accepted", "rejected", "failed", "train_loss",
                              "uplink_bytes", "downlink_bytes", "round_s", "wall_s"})

    def _with_user_metrics(self, ev: dict[str, Any], user_fn, rnd: int,
                           arrays: ArrayRecord | None) -> tuple[dict[str, Any], MetricRecord | None]:
        """(the row's evaluation columns, the MetricRecord for Flower): fedlatent's ``ev`` merged with what a
        user's ``evaluate_fn`` returned (its non-scalar metrics go to Flower only)."""
        record = dict(finite_metrics(ev))
        if user_fn is not None:
            got = user_fn(rnd, arrays if arrays is not None else self.initial_arrays())
            if got is not None:
                if not isinstance(got, MetricRecord):
                    raise FedLatentError(f"evaluate_fn must return a flwr MetricRecord or None, "
                                         f"got {type(got).__name__}")
                clash = sorted(self._BOOKKEEPING & set(got.keys()))
                if clash:
                    raise FedLatentError(f"evaluate_fn returned metric(s) {', '.join(clash)}: names of the "
                                         f"history's own columns; rename them")
                user = dict(got.items())
                ev = {**ev, **{k: v for k, v in user.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}}
                record.update(user)
        return ev, (MetricRecord(record) if record else None)

    def _write_config(self) -> None:
        from .. import __version__

        import flwr
        import numpy as np
        import platform

        self.run.write_config({
            "method": self.strategy.name, "method_options": self.strategy.options(), "config": self.cfg.to_dict(),
            "dataset": {**self.data_info, "requested": self.spec.dataset,
                        "image_size_requested": self.spec.image_size},
            "versions": {"fedlatent": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "flwr": flwr.__version__, "python": platform.python_version()},
            "device": str(self.device), "runtime": "flower", "nodes": {str(c): n for c, n in (self.nodes or {}).items()},
            "client_sizes": list(self.ctx.client_sizes), "exclude_generator": self.spec.exclude_generator,
        })

    # -- the outcome -------------------------------------------------------------------------------------
    def export_distilled(self) -> Path | None:
        """Write the method's distilled set into the run folder (FedDGM: distilled.safetensors via
        :func:`fedlatent.export.save_distilled`; DynaFed: pseudo.safetensors); None without one."""
        if self.run is None:
            return None
        s = self.strategy
        if callable(getattr(s, "save_distilled", None)):
            from ..artifacts import DISTILLED_FILE

            return s.save_distilled(self.run.path / DISTILLED_FILE)
        if getattr(s, "pseudo", None) is not None and callable(getattr(s, "save", None)):
            from ..artifacts import PSEUDO_FILE

            s.save(self.run.path)
            return self.run.path / PSEUDO_FILE
        return None

    def result(self) -> FlowerSimulationResult:
        """The run's :class:`FlowerSimulationResult` (writes summary.json and the distilled set with a run folder)."""
        if not any(r.get("accuracy") is not None for r in self.history):
            raise FedLatentError("the Flower run recorded no evaluation (did it start?)")
        o = self.state.outcome()
        distilled = self.export_distilled()
        more = {"failures": self.failures} if "failures" in SimulationResult.__dataclass_fields__ else {}
        res = FlowerSimulationResult(
            **more, method=self.strategy.name, history=self.history, final_accuracy=o["final_accuracy"],
            best_accuracy=o["best_accuracy"], best_round=o["best_round"], rounds=self.cfg.rounds, wall_s=time.perf_counter() - self.t_start,
            uplink_bytes=self.totals["up"], downlink_bytes=self.totals["down"], rejected=self.totals["rejected"],
            rejections=self.rejections, out_dir=self.run.path if self.run is not None else None, strategy=self.strategy,
            final_by_model=o["final_by_model"], nodes=dict(self.nodes or {}), flower=self.flower_result, distilled=distilled,
            connect_s=self.connect_s)
        self.state.write_summary(res.summary(), runtime="flower", distilled=str(distilled) if distilled else None)
        return res


def _reason(msg: Message) -> str:
    err = msg.error
    text = str(getattr(err, "reason", err) or "unknown error").strip()
    return text.splitlines()[-1] if text else "unknown error"


__all__ = ["FedLatentStrategy", "FlowerSimulationResult"]
