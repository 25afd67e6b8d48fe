"""Experiment tracking: per-round metrics, the run's config and its artefacts, sent to TensorBoard and/or MLflow.

``--log csv,tensorboard,mlflow`` picks the trackers. CSV is the default and is always on: it is the run folder's
``metrics.csv``, written by the run itself. The others are optional extras (``pip install 'fedlatent[tensorboard]'``
/ ``'fedlatent[mlflow]'``) and write into the run folder, with no server:

tensorboard
    event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``): one scalar per numeric metric
    and round, the config as a JSON text summary, the PNG artefacts as images.
mlflow
    a local file store in ``RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``), experiment
    ``fedlatent``, one MLflow run per run folder: the config flattened to params (``config.lr``, ...), the
    per-round metrics with the round as step, the artefacts (PNGs, ``distilled.safetensors``, report, CSV). MLflow 3
    keeps its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; it is switched on for this store
    only when the variable is unset. ``$MLFLOW_TRACKING_URI``, when set, is used instead (a database or a server).

Use :func:`open_trackers` (also exported as ``open``)::

    with tracking.open_trackers(run_dir, ["tensorboard", "mlflow"], config) as t:
        for row in rows:
            t.log_metrics(row, step=row["round"])
        t.log_artifact(run_dir / "accuracy.png")

Backends start on first use, so opening trackers before the run folder exists creates nothing. On a resumed run
(``resume_from=R``) rows up to round R are not sent again, TensorBoard purges the events after R that the killed
run may have written, and MLflow continues the run folder's own MLflow run.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .utils import FedLatentError

TRACKERS = ("csv", "tensorboard", "mlflow")
DEFAULT = ("csv",)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}  # name: (module, extra)
TB_DIR, MLFLOW_DIR, EXPERIMENT = "tensorboard", "mlruns", "fedlatent"
ARTIFACT_SUFFIXES = (".png", ".safetensors", ".md", ".csv", ".json")


def parse_log(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"csv,tensorboard"`` -> ``("csv", "tensorboard")``; csv is always included; unknown names are one error."""
    if text is None:
        return DEFAULT
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    names = [p.strip().lower() for p in parts if p.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise FedLatentError(f"unknown tracker {bad[0]!r} in --log; choose from {', '.join(TRACKERS)} "
                             "(comma-separated, e.g. --log csv,tensorboard)")
    out = ["csv"] + [n for n in names if n != "csv"]
    return tuple(dict.fromkeys(out))


def _require(name: str) -> None:
    import importlib.util

    module, extra = EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise FedLatentError(f"--log {name} needs the {module} package: pip install 'fedlatent[{extra}]'")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` with JSON-encoded leaves (lists stay one value)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    return out


def numeric_metrics(row: Mapping[str, Any], skip: Iterable[str] = ("round",)) -> dict[str, float]:
    """The finite numeric entries of a metrics row (text such as client ids and empty cells are left out)."""
    skip = set(skip)
    out = {}
    for k, v in row.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


class Tracker:
    """One tracking back end. Subclasses override the four calls; the base ignores everything."""

    name = "base"

    def log_params(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class TensorBoardTracker(Tracker):
    """Event files in ``run_dir/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_from: int | None = None):
        self.dir = Path(run_dir) / TB_DIR
        self.resume_from = resume_from
        self._w = None

    @property
    def writer(self):
        if self._w is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.resume_from is None else int(self.resume_from) + 1
            self._w = SummaryWriter(log_dir=str(self.dir), purge_step=purge)
        return self._w

    def log_params(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, default=str, sort_keys=True)
        self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        for k, v in numeric_metrics(row).items():
            self.writer.add_scalar(k, v, global_step=int(step))

    def log_artifact(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.suffix.lower() != ".png" or not p.is_file():
            return  # TensorBoard has no artefact store: images only
        from matplotlib.image import imread

        img = imread(str(p))  # float HWC in [0, 1] (RGB or RGBA)
        if img.ndim == 2:
            img = img[:, :, None]
        self.writer.add_image(p.stem, img[:, :, :3] if img.shape[2] >= 3 else img, global_step=0, dataformats="HWC")

    def close(self, status: str = "FINISHED") -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


_MLFLOW_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


class MLflowTracker(Tracker):
    """An MLflow run in a local file store ``run_dir/mlruns`` (or ``$MLFLOW_TRACKING_URI``), via MlflowClient."""

    name = "mlflow"
    PARAM_CHARS = 6000  # MLflow's limit on a param value
    BATCH = 100

    def __init__(self, run_dir: Path, resume_from: int | None = None):
        self.run_dir = Path(run_dir)
        self.resume_from = resume_from
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir.resolve() / MLFLOW_DIR).as_uri()
        self._client = self._run_id = None

    @property
    def client(self):
        if self._client is None:
            if self.uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            c = self.client
            exp = c.get_experiment_by_name(EXPERIMENT)
            eid = exp.experiment_id if exp is not None else c.create_experiment(EXPERIMENT)
            tag = str(self.run_dir.resolve())
            if self.resume_from is not None:  # continue this folder's own MLflow run
                old = c.search_runs([eid], filter_string=f"tags.`fedlatent.run_dir` = '{tag}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
                if old:
                    self._run_id = old[0].info.run_id
                    c.update_run(self._run_id, status="RUNNING")
                    return self._run_id
            run = c.create_run(eid, run_name=self.run_dir.name, tags={"fedlatent.run_dir": tag})
            self._run_id = run.info.run_id
        return self._run_id

    @staticmethod
    def key(name: str) -> str:
        return _MLFLOW_KEY.sub("_", name)

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(config)
        params = [Param(self.key(k)[:250], v[: self.PARAM_CHARS]) for k, v in flat.items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])

    def log_metrics(self, row: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(self.key(k), v, ms, int(step)) for k, v in numeric_metrics(row).items()]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.BATCH])

    def log_artifact(self, path: str | os.PathLike) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self._run_id is not None:
            self.client.set_terminated(self._run_id, status=status)
            self._run_id = None


class Trackers(Tracker):
    """The trackers of one run, called together; a context manager (closes them, FAILED on an exception)."""

    name = "trackers"

    def __init__(self, trackers: Sequence[Tracker], names: Sequence[str], resume_from: int | None = None):
        self.trackers, self.names, self.resume_from = list(trackers), tuple(names), resume_from

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_params(self, config: Mapping[str, Any]) -> None:
        if self.resume_from is not None:
            return  # logged by the original run
        for t in self.trackers:
            t.log_params(config)

    def log_metrics(self, row: Mapping[str, Any], step: int | None = None) -> None:
        step = int(row["round"]) if step is None else int(step)
        if self.resume_from is not None and step <= self.resume_from:
            return  # the killed run sent these rounds already
        for t in self.trackers:
            t.log_metrics(row, step)

    def log_artifact(self, path: str | os.PathLike) -> None:
        for t in self.trackers:
            t.log_artifact(path)

    def log_run_folder(self, run_dir: str | os.PathLike, suffixes: Sequence[str] = ARTIFACT_SUFFIXES) -> list[Path]:
        """Send the run folder's files (PNGs, distilled sets, report, CSV, JSON; not checkpoints) as artefacts."""
        files = sorted(p for p in Path(run_dir).iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        for p in files:
            self.log_artifact(p)
        return files

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.close(status)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def open_trackers(run_dir: str | os.PathLike, names: str | Sequence[str] | None = None,
                  config: Mapping[str, Any] | None = None, resume_from: int | None = None) -> Trackers:
    """The trackers ``names`` (see :func:`parse_log`) for ``run_dir``; logs ``config`` as params when given.

    Raises FedLatentError at once when a tracker's package is missing (before any training).
    """
    names = parse_log(names)
    made: list[Tracker] = []
    for n in names:
        if n == "csv":
            continue  # metrics.csv is written by the run folder itself
        _require(n)
        cls = TensorBoardTracker if n == "tensorboard" else MLflowTracker
        made.append(cls(Path(run_dir), resume_from=resume_from))
    t = Trackers(made, names, resume_from=resume_from)
    if config is not None:
        t.log_params(config)
    return t


open = open_trackers  # noqa: A001 - the module's short name for it: tracking.open(run_dir, names, config)

__all__ = ["TRACKERS", "parse_log", "flatten", "numeric_metrics", "Tracker", "TensorBoardTracker", "MLflowTracker",
           "Trackers", "open_trackers"]
