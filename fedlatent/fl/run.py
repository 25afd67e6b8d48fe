"""The run folder of a simulation and the reusable metrics writer / plots.

A run folder holds::

    config.json     every option of the run (method, method options, FLConfig, dataset, versions)
    metrics.csv     one row per round (round 0 = initial evaluation); see METRIC_COLUMNS
    accuracy.png    test accuracy vs round
    partition.csv   samples per client and class (+ partition.png), via fedlatent.data.partition
    summary.json    final / best accuracy, totals, rejected uploads, wall time

Every file is written atomically (temporary file + rename), so a crash never leaves a half-written
file; metrics.csv and accuracy.png are rewritten after every round, so an interrupted run keeps a
valid record of the rounds it finished.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..utils import FedLatentError, atomic_write, atomic_write_text

METRIC_COLUMNS = ["round", "accuracy", "loss", "clients", "client_ids", "accepted", "rejected", "train_loss",
                  "uplink_bytes", "downlink_bytes", "round_s", "wall_s"]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


class MetricsWriter:
    """Accumulates per-round rows and rewrites a CSV atomically after each :meth:`append`.

    ``columns`` come first in that order; any other key a row brings (e.g. a method's extra metric)
    is appended as a new column. Missing values are written as empty cells.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] = METRIC_COLUMNS):
        self.path = Path(path)
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any]) -> None:
        for k in row:
            if k not in self.columns:
                self.columns.append(k)
        self.rows.append(dict(row))
        self.flush()

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in self.rows:
            w.writerow([_fmt(r.get(c)) for c in self.columns])
        return buf.getvalue()

    def flush(self) -> None:
        atomic_write_text(self.path, self.to_csv())


def _parse(v: str) -> float | str | None:
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, float | str | None]]:
    """Read a metrics.csv back (numbers as float, empty cells as None, other text as str)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, y: str = "accuracy",
                x: str = "round", title: str | None = None, ylabel: str | None = None) -> None:
    """Plot ``y`` vs ``x`` for several labelled row lists (rows lacking ``y`` are skipped); PNG, atomic.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, rows in curves.items():
        pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and not (isinstance(r[y], float) and math.isnan(r[y]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
    if x == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or any(k for k in curves):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, torch.dtype):
            return str(o)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n")


class RunFolder:
    """A run's output folder. Refuses to reuse a non-empty folder unless ``overwrite=True``.

    With ``overwrite`` the run files listed in :attr:`FILES` are deleted first (so a crashed rerun
    leaves no stale summary behind); nothing else in the folder is touched (a mistyped ``--out`` must
    never wipe unrelated files).
    """

    FILES = ("config.json", "metrics.csv", "accuracy.png", "partition.csv", "partition.png", "summary.json",
             "model.safetensors")

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = self.check(path, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:  # with overwrite: no stale file of the old run may pass for this run's
            (self.path / name).unlink(missing_ok=True)
        self.metrics = MetricsWriter(self.path / "metrics.csv")

    @staticmethod
    def check(path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Raise FedLatentError if ``path`` cannot be used as a run folder (call it before slow work)."""
        p = Path(path).expanduser()
        if p.exists() and not p.is_dir():
            raise FedLatentError(f"run folder {p} exists and is not a directory")
        if p.is_dir() and any(p.iterdir()) and not overwrite:
            raise FedLatentError(f"run folder {p} already exists and is not empty; "
                                 "choose another --out or pass --overwrite")
        return p

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json(self.path / "config.json", dict(config))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.path / "summary.json", dict(summary))

    def log_round(self, row: Mapping[str, Any], label: str = "", plot: bool = True) -> None:
        """Append a metrics row; refresh accuracy.png when ``plot`` and the row has an accuracy."""
        self.metrics.append(row)
        if plot and row.get("accuracy") is not None:
            self.plot_accuracy(label)

    def plot_accuracy(self, label: str = "") -> None:
        plot_curves({label: self.metrics.rows}, self.path / "accuracy.png", y="accuracy",
                    title="test accuracy" + (f" ({label})" if label else ""))


def iter_rows(rows: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    """The non-empty values of ``key`` in ``rows``."""
    return [float(r[key]) for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]


__all__ = ["METRIC_COLUMNS", "MetricsWriter", "RunFolder", "read_metrics", "plot_curves", "write_json", "iter_rows"]
