"""A method against its baseline on the same partition, initial weights and client schedule.

:func:`compare` reads two metrics tables (metrics.csv rows, or ``SimulationResult.history``) and gives the final
accuracies, the gain (method final - baseline final, in accuracy points) and, for each of the two, the first
round whose accuracy reaches the baseline's final accuracy (``None``: never). :func:`plot_comparison` draws both
curves with the baseline's final accuracy as a dashed line, and :func:`comparison_markdown` is the report.md
section.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


def curve(rows: Sequence[Mapping[str, Any]], key: str = "accuracy") -> list[tuple[int, float]]:
    """``[(round, value)]`` of the rows that have a finite ``key`` (rounds without an evaluation are skipped)."""
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append((int(r["round"]), float(v)))
    return out


def rounds_to_reach(rows: Sequence[Mapping[str, Any]], target: float, key: str = "accuracy") -> int | None:
    """The first round whose ``key`` is at least ``target`` (None if no evaluated round reaches it)."""
    return next((rnd for rnd, v in curve(rows, key) if v >= target), None)


@dataclass(frozen=True)
class Comparison:
    """``method`` vs ``baseline``; ``rounds_to_baseline_final`` maps each label to its first round at or above the
    baseline's final accuracy."""

    method: str
    baseline: str
    key: str
    final: float
    baseline_final: float
    best: float
    baseline_best: float
    rounds_to_baseline_final: dict[str, int | None]

    @property
    def gain(self) -> float:
        """Final accuracy of the method minus the baseline's."""
        return self.final - self.baseline_final

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "baseline": self.baseline, "metric": self.key, "final": self.final,
                "baseline_final": self.baseline_final, "gain": self.gain, "best": self.best,
                "baseline_best": self.baseline_best, "rounds_to_baseline_final": dict(self.rounds_to_baseline_final)}


def compare(rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]], *,
            method: str = "feddgm", baseline: str = "fedavg", key: str = "accuracy") -> Comparison:
    """Compare two runs' ``key`` curves (see the module docstring); ValueError when a run has no evaluation."""
    a, b = curve(rows, key), curve(baseline_rows, key)
    if not a or not b:
        raise ValueError(f"both runs need at least one evaluated {key!r} (got {len(a)} and {len(b)})")
    target = b[-1][1]
    return Comparison(method, baseline, key, a[-1][1], target, max(v for _, v in a), max(v for _, v in b),
                      {method: rounds_to_reach(rows, target, key), baseline: rounds_to_reach(baseline_rows, target, key)})


def plot_comparison(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike,
                    baseline: str, key: str = "accuracy", title: str | None = None):
    """Every labelled run's ``key`` vs round, and the ``baseline`` run's final value as a dashed line; PNG, atomic.

    Returns the matplotlib Figure (its axes hold one line per run, then the dashed target line).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .utils import atomic_write

    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} is not one of the curves {list(curves)}")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, rows in curves.items():
        pts = curve(rows, key)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label,
                    linestyle="--" if label == baseline else "-")
    target = curve(curves[baseline], key)
    if target:
        ax.axhline(target[-1][1], color="grey", linestyle=":", linewidth=1,
                   label=f"{baseline} final {target[-1][1]:.4f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.set_title(title or f"test {key}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return fig


def comparison_markdown(c: Comparison) -> str:
    """The report.md section: final / best of both, the gain, and the rounds to reach the baseline's final."""

    def rounds(label: str) -> str:
        r = c.rounds_to_baseline_final[label]
        return "never" if r is None else str(r)

    return "\n".join([
        f"## {c.method} vs {c.baseline} (same partition, initial weights and client schedule)", "",
        f"| run | final {c.key} | best {c.key} | rounds to reach {c.baseline}'s final ({c.baseline_final:.4f}) |",
        "|---|---:|---:|---:|",
        f"| {c.method} | {c.final:.4f} | {c.best:.4f} | {rounds(c.method)} |",
        f"| {c.baseline} | {c.baseline_final:.4f} | {c.baseline_best:.4f} | {rounds(c.baseline)} |", "",
        f"- gain of {c.method} over {c.baseline}: {100 * c.gain:+.2f} accuracy points (final)", ""])


__all__ = ["curve", "rounds_to_reach", "Comparison", "compare", "plot_comparison", "comparison_markdown"]
