"""The federated simulation engine: one process, clients run one after the other.

``run_simulation(strategy, data, config, out_dir)`` partitions the training set, draws the client
schedule, and runs the rounds described in :mod:`fedlatent.fl.base`. One seed fixes everything:

* partition: ``fedlatent.data.partition(..., seed=config.seed)`` (its own stream per scheme);
* schedule: round r's clients are drawn from the stream (seed, "schedule", r), independent of the
  method, so every method sees the same clients in every round, and of the number of rounds;
* initial weights: (seed, "model", "init"); local shuffles: (seed, "client", r, c).

On CPU two runs with the same seed produce identical metrics (apart from the timing columns).
:func:`simulate` is the Python entry point that ``fedlatent simulate`` wraps.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import ImageData, load_dataset
from ..data.hf import given_partitions
from ..data.partition import label_counts, partition, save_partition_report
from ..utils import FedLatentError, default_device, numpy_rng
from ..backends import make_backend
from ..backends.serial import sequential_map
from .base import ClientData, ClientFailure, FLConfig, FLContext, Strategy, Upload, get_method
from .hetero import architecture_summary, assign_architectures
from .engine import PLOT_INTERVAL_S, RunState, evaluate_all  # noqa: F401 - PLOT_INTERVAL_S re-exported
from .run import RunFolder
from .schedule import client_schedule, clients_per_round  # noqa: F401 - re-exported (old path)
from .transfer import public_private_split

log = logging.getLogger("fedlatent.fl")

ClientMap = Callable[[Callable[..., Upload], Iterable[tuple]], list]



def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "", "auto"):
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FedLatentError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedLatentError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


@dataclass
class SimulationResult:
    """Outcome of :func:`run_simulation`; ``history`` holds the metrics.csv rows."""

    method: str
    history: list[dict[str, Any]]
    final_accuracy: float
    best_accuracy: float
    best_round: int
    rounds: int
    wall_s: float
    uplink_bytes: int
    downlink_bytes: int
    rejected: int
    rejections: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    strategy: Strategy | None = None
    final_by_model: dict[str, float] = field(default_factory=dict)  # accuracy_<name> of the last evaluation
    failures: list[dict[str, Any]] = field(default_factory=list)  # clients whose work failed (parallel runners)

    def summary(self) -> dict[str, Any]:
        out = {
            "method": self.method, "final_accuracy": self.final_accuracy, "best_accuracy": self.best_accuracy,
            "best_round": self.best_round, "rounds": self.rounds, "wall_s": self.wall_s,
            "uplink_bytes": self.uplink_bytes, "downlink_bytes": self.downlink_bytes, "rejected": self.rejected,
            "rejections": self.rejections[:1000], "out_dir": str(self.out_dir) if self.out_dir else None,
            "failed": len(self.failures), "failures": self.failures[:1000],
        }
        if self.final_by_model:
            out["final_accuracy_per_model"] = dict(self.final_by_model)
        return out

    def line(self) -> str:
        """One-line human summary."""
        where = f" -> {self.out_dir}" if self.out_dir else ""
        per = "".join(f", {k} {v:.4f}" for k, v in self.final_by_model.items()) if len(self.final_by_model) > 1 else ""
        return (f"{self.method}: final accuracy {self.final_accuracy:.4f}{per}, best {self.best_accuracy:.4f} "
                f"(round {self.best_round}), {self.rounds} rounds, {self.wall_s:.1f} s, "
                f"{self.rejected} rejected uploads{where}")


def _strategy_overrides(strategy: Strategy, hook: str) -> bool:
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


def split_clients(labels: np.ndarray, cfg: FLConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(public_idx, private_idx, parts)``: the training-set indices of the public split and of every client.

    The public split (``cfg.public_fraction``, if any) is drawn first; the clients' partition
    (``cfg.partition`` seeded by ``cfg.seed``) only sees the private part. Every backend (in-process, Ray,
    a Flower ClientApp carving its own share) calls this, so all of them give each client the same data.
    """
    labels = np.asarray(labels)
    public_idx, private_idx = public_private_split(labels, cfg.public_fraction, cfg.seed)
    parts = partition(labels[private_idx], cfg.partition, cfg.clients, cfg.seed, alpha=cfg.alpha,
                      min_size=cfg.min_size, classes_per_client=cfg.classes_per_client)
    if len(public_idx):
        parts = [private_idx[p] for p in parts]
    return public_idx, private_idx, parts


def run_simulation(strategy: Strategy, data: ImageData, config: FLConfig, out_dir: str | os.PathLike | None = None,
                   overwrite: bool = False, run_info: Mapping[str, Any] | None = None,
                   progress: bool = True, client_map: ClientMap | None = None,
                   checkpoint_fn: Callable[[int, Strategy, dict[str, Any]], None] | None = None,
                   resume: Mapping[str, Any] | None = None, tracker: Any = None) -> SimulationResult:
    """Run ``config.rounds`` federated rounds of ``strategy`` on ``data``.

    With ``out_dir`` the run folder (:mod:`fedlatent.fl.run`) is written as the run goes; an existing
    non-empty folder is refused unless ``overwrite``. ``run_info`` is merged into config.json.
    ``client_map(fn, jobs)`` runs the round's clients: it must return ``[fn(*args) for args in jobs]``
    in order (``args = (ctx, rnd, client_id, payload, data)``; for a strategy's optional
    ``client_init``, run once before round 1, ``args = (ctx, client_id, data)``); the default is
    :func:`sequential_map`, a parallel back end (e.g. :class:`fedlatent.backends.ray.RayBackend`) passes its own.
    A parallel runner may return a :class:`ClientFailure` in place of a client's result: that client is
    logged, recorded (``failed`` column, ``SimulationResult.failures``) and left out of the round; when no
    client of a round returned, FedLatentError is raised (a failed ``client_init`` is always fatal).

    Checkpoint/resume (:mod:`fedlatent.fl.checkpoint`): ``checkpoint_fn(rnd, strategy, engine_state)`` is
    called after every recorded round (``engine_state``: history, rejections, totals, wall_s, final);
    ``resume`` (``{"round", "strategy", "history", "rejections", "totals", "wall_s"}``) restores the strategy
    state after ``setup`` and continues with round ``resume["round"] + 1`` (pass ``overwrite=True``).
    ``tracker`` (:func:`fedlatent.tracking.open_trackers`) gets config.json as params and every metrics row.
    """
    t_start = time.perf_counter()
    cfg = config.check()
    device = resolve_device(cfg.device)
    if out_dir is not None:
        RunFolder.check(out_dir, overwrite)

    client_models = assign_architectures(cfg.client_models, cfg.clients, cfg.seed)
    if client_models is not None and not strategy.heterogeneous and set(client_models) != {cfg.model}:
        raise FedLatentError(f"method {strategy.name!r} needs one architecture for all clients; "
                             "--client-models is for heterogeneous methods such as feddf and fedmd (use --model)")
    labels = data.y_train.cpu().numpy()
    given = given_partitions(data, cfg.clients)  # a Flower Datasets partitioner's partitions (fedlatent.data.hf)
    if given is not None and cfg.public_fraction > 0:
        raise FedLatentError("public_fraction cannot be combined with partitions given by the data")
    public_idx, private_idx, parts = split_clients(labels, cfg) if given is None else \
        (np.zeros(0, dtype=np.int64), np.arange(len(labels)), given)
    counts = label_counts(labels, parts, data.num_classes)
    schedule = client_schedule(cfg.clients, cfg.rounds, cfg.participation, cfg.seed)

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    public_t = torch.from_numpy(public_idx).to(device)
    ctx = FLContext(config=cfg, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size,
                    class_names=list(data.classes), client_sizes=[int(len(p)) for p in parts], device=str(device),
                    client_models=client_models,
                    public_x=x_train.index_select(0, public_t) if len(public_idx) else None,
                    public_y=y_train.index_select(0, public_t) if len(public_idx) else None,
                    mean=tuple(data.mean), std=tuple(data.std), dataset=data.name)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    client_idx = [torch.from_numpy(p).to(device) for p in parts]

    run = RunFolder(out_dir, overwrite=overwrite) if out_dir is not None else None
    if run is not None:
        ctx.run_dir = str(run.path)  # methods may write their own artefacts there (e.g. DynaFed's pseudo set)
    if run is not None:
        info = {
            "method": strategy.name, "method_options": strategy.options(), "config": cfg.to_dict(),
            "dataset": {"name": data.name, "source": data.source, "channels": data.channels,
                        "image_size": data.image_size, "num_classes": data.num_classes,
                        "train": int(len(data.y_train)), "test": int(len(data.y_test))},
            "versions": {"fedlatent": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "device": str(device),
        }
        if client_models is not None:
            info["client_models"] = {"spec": cfg.client_models, "per_client": client_models,
                                     "counts": architecture_summary(client_models)}
        if len(public_idx):
            info["public_split"] = {"fraction": cfg.public_fraction, "public": int(len(public_idx)),
                                    "private": int(len(private_idx))}
        if given is not None:
            info["partition_given"] = data.extra.get("partitioner", "by the data")
        info.update(run_info or {})
        run.write_config(info)
        if tracker is not None:
            tracker.log_params(info)
        save_partition_report(run.path, counts, list(data.classes))

    strategy.setup(ctx)
    if resume is None and _strategy_overrides(strategy, "client_init"):
        # Client-side preparation before round 1 (e.g. FedMD pre-training); no communication. On resume
        # the strategy's state_dict restores the clients' local state instead.
        def init_jobs():
            for cid in range(cfg.clients):
                idx = client_idx[cid]
                yield ctx, cid, ClientData(cid, x_train.index_select(0, idx), y_train.index_select(0, idx))

        jobs = tqdm(init_jobs(), total=cfg.clients, desc=f"{strategy.name} client init", disable=not progress,
                    dynamic_ncols=True, leave=False)
        for cid, state in enumerate((client_map or sequential_map)(strategy.client_init, jobs)):
            if isinstance(state, ClientFailure):
                raise FedLatentError(f"client_init of client {cid} failed ({state.attempts} attempt(s)): {state.error}")
            if state is not None:
                strategy.keep_client_state(cid, state)
    state = RunState(strategy, cfg, ctx, run, t_start, tracker=tracker)
    start_round = 1
    if resume is not None:  # continue a checkpointed run (fedlatent.fl.checkpoint)
        strategy.load_state_dict(resume["strategy"])
        start_round = int(resume["round"]) + 1
        state.rejections = list(resume.get("rejections", []))
        state.failures = list(resume.get("failures", []))
        state.totals.update(resume.get("totals", {}))
        state.t_start -= float(resume.get("wall_s", 0.0))

    if resume is None:
        state.record(state.initial_row(evaluate_all(strategy, x_test, y_test, cfg.eval_batch_size)),
                     final=cfg.rounds == 0)
    else:  # the rounds already done, as checkpointed
        for r in resume.get("history", []):
            state.record(dict(r), final=False)

    bar = tqdm(range(start_round, cfg.rounds + 1), desc=strategy.name, disable=not progress, dynamic_ncols=True,
               initial=start_round - 1, total=cfg.rounds)
    for rnd in bar:
        t_round = time.perf_counter()
        selected = [int(c) for c in schedule[rnd - 1]]
        references: dict[int, dict[str, torch.Tensor]] = {}

        def jobs():  # lazily, so a sequential run holds one client's data at a time
            for cid in selected:
                payload = strategy.client_payload(rnd, cid)
                references[cid] = payload
                idx = client_idx[cid]
                yield ctx, rnd, cid, payload, ClientData(cid, x_train.index_select(0, idx), y_train.index_select(0, idx),
                                                         state=strategy.client_state(cid))

        results = list((client_map or sequential_map)(strategy.client_update, jobs()))
        failed = [(cid, u.error, u.attempts) for cid, u in zip(selected, results) if isinstance(u, ClientFailure)]
        ok = [(cid, u) for cid, u in zip(selected, results) if not isinstance(u, ClientFailure)]
        for cid, u in ok:  # local state stays with its client, accepted or not
            if isinstance(u, Upload) and u.client_id == cid and u.state is not None:
                strategy.keep_client_state(cid, u.state)
        outcome = state.aggregate_round(rnd, selected, [c for c, _ in ok], [u for _, u in ok], references, failed)
        references = results = ok = None  # free the round's tensors before evaluation
        final = rnd == cfg.rounds
        ev = evaluate_all(strategy, x_test, y_test, cfg.eval_batch_size) if final or rnd % cfg.eval_every == 0 else {}
        state.record(state.round_row(rnd, selected, outcome, ev, t_round), final)
        if checkpoint_fn is not None:
            checkpoint_fn(rnd, strategy, {"history": state.history, "rejections": state.rejections,
                                          "failures": state.failures, "totals": dict(state.totals),
                                          "wall_s": time.perf_counter() - state.t_start, "final": final})
        if ev:
            bar.set_postfix(acc=f"{ev['accuracy']:.4f}", rej=state.totals["rejected"])
    bar.close()

    o = state.outcome()
    result = SimulationResult(
        method=strategy.name, history=state.history, final_accuracy=o["final_accuracy"],
        best_accuracy=o["best_accuracy"], best_round=o["best_round"], rounds=cfg.rounds,
        wall_s=time.perf_counter() - state.t_start, uplink_bytes=state.totals["up"],
        downlink_bytes=state.totals["down"], rejected=state.totals["rejected"], rejections=state.rejections,
        out_dir=run.path if run is not None else None, strategy=strategy, final_by_model=o["final_by_model"],
        failures=state.failures,
    )
    state.write_summary(result.summary(), **({"client_models": client_models} if client_models is not None else {}))
    return result


def simulate(method: str = "fedavg", dataset: str = "digits", data_root: str | os.PathLike | None = None,
             image_size: int | None = None, out: str | os.PathLike | None = None, overwrite: bool = False,
             method_options: Mapping[str, Any] | None = None, progress: bool = True,
             run_info: Mapping[str, Any] | None = None, data: ImageData | None = None,
             client_map: ClientMap | None = None, backend: Any = "serial", ray_address: str | None = None,
             log: str | Sequence[str] | None = None,
             on_round: Callable[[int, Strategy, dict[str, Any]], None] | None = None,
             **config: Any) -> SimulationResult:
    """Load ``dataset``, build ``method`` and run the simulation; the API behind ``fedlatent simulate``.

    ``config`` holds :class:`FLConfig` fields (clients, rounds, alpha, lr, ...); ``method_options``
    the method's constructor arguments (e.g. ``{"mu": 0.01}`` for FedProx). ``image_size`` resizes the
    images (``digits`` defaults to 16 px). Pass ``data`` to reuse an already loaded dataset, and
    ``client_map`` to run clients elsewhere (see :func:`run_simulation`). ``backend``: "serial" (in this
    process), "ray" (clients as Ray tasks; a local Ray instance, or the cluster at ``ray_address``, started and
    stopped for this run) or a :class:`fedlatent.backends.ray.RayBackend` (its settings; the caller closes it).
    ``log``: trackers besides metrics.csv (:mod:`fedlatent.tracking`, e.g. ``"tensorboard,mlflow"``; needs ``out``).
    ``on_round(rnd, strategy, engine_state)``: called after every recorded round (run_simulation's
    ``checkpoint_fn``), e.g. to measure the strategy's state round by round.
    """
    fields = set(FLConfig.__dataclass_fields__)
    unknown = sorted(set(config) - fields)
    if unknown:
        raise FedLatentError(f"unknown simulation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    cfg = FLConfig(**config).check()
    if out is not None:
        RunFolder.check(out, overwrite)
    from ..tracking import open_trackers

    tracker = open_trackers(out, log) if out is not None else None
    runner = make_backend(backend, ray_address)
    if runner is not None and client_map is not None:
        raise FedLatentError("pass either client_map or backend, not both")
    cls = get_method(method)
    try:
        strategy = cls(**dict(method_options or {}))
    except TypeError as e:
        raise FedLatentError(f"bad options for method {method!r}: {e}") from None
    if data is None:
        if image_size is None and dataset == "digits":
            image_size = 16
        data = load_dataset(dataset, root=data_root, resize=image_size)
    info = {"dataset_name": dataset, "image_size_requested": image_size,
            "data_root": None if data_root is None else str(data_root)}
    if runner is not None:
        info["backend"] = runner.describe()
        runner.attach(strategy)
    info.update(run_info or {})
    status = "FAILED"
    try:
        result = run_simulation(strategy, data, cfg, out_dir=out, overwrite=overwrite, run_info=info,
                                progress=progress, client_map=runner.client_map if runner is not None else client_map,
                                tracker=tracker, checkpoint_fn=on_round)
        if tracker:
            tracker.log_run_folder(result.out_dir)
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.close(status)
        if runner is not None and runner is not backend:
            runner.close()


__all__ = ["ClientFailure", "split_clients", "evaluate_all", "sequential_map", "clients_per_round", "client_schedule", "resolve_device", "SimulationResult", "run_simulation", "simulate"]
