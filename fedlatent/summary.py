"""The table printed at the end of every command that trains: final and best metrics, time, and where the files are.

:func:`summarize` turns a run's metrics rows (metrics.csv, or ``SimulationResult.history``) into labelled
entries; :func:`render` draws them as a table with ``rich`` (plain aligned text when rich is missing or
``plain=True``); :func:`echo_summary` does both and prints through click.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

#: Run-folder entries listed under "files", in this order, when they exist.
RUN_FILES = ("config.json", "metrics.csv", "accuracy.png", "report.md", "distilled.safetensors", "summary.json",
             "partition.csv", "checkpoints", "tensorboard", "mlruns")


@dataclass
class Summary:
    """What :func:`render` shows: ``metrics`` rows (name, final, best, round of best), ``info`` and ``files``."""

    title: str
    metrics: list[tuple[str, str, str, str]] = field(default_factory=list)
    info: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def format_seconds(s: float) -> str:
    """``75.3`` -> ``"1 min 15.3 s"``; under a minute ``"12.3 s"``; an hour or more ``"1 h 02 min"``."""
    s = round(float(s), 1)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.1f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """accuracy, loss, then per-model accuracy_<name> / loss_<name> columns, as they appear."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k in ("accuracy", "loss") or k.startswith(("accuracy_", "loss_")):
                seen.setdefault(k)
    head = [k for k in ("accuracy", "loss") if k in seen]
    return head + [k for k in seen if k not in head]


def summarize(rows: Sequence[Mapping[str, Any]], *, title: str, wall_s: float | None = None,
              out_dir: str | os.PathLike | None = None, info: Mapping[str, Any] | None = None,
              files: Sequence[str | os.PathLike] | None = None) -> Summary:
    """The summary of one run: for each metric its final value, its best (max for accuracies, min for losses) and
    the round of the best; rounds and time; the run folder and the files in it (``files``, else :data:`RUN_FILES`
    that exist)."""
    s = Summary(title)
    for name in metric_names(rows):
        pts = [(int(r["round"]) if _num(r.get("round")) is not None else i, _num(r.get(name)))
               for i, r in enumerate(rows)]
        pts = [(rnd, v) for rnd, v in pts if v is not None]
        if not pts:
            continue
        lower = name == "loss" or name.startswith("loss_")
        best_rnd, best = min(pts, key=lambda t: (t[1], t[0])) if lower else max(pts, key=lambda t: (t[1], -t[0]))
        s.metrics.append((name, f"{pts[-1][1]:.4f}", f"{best:.4f}", str(best_rnd)))
    rounds = [int(r["round"]) for r in rows if _num(r.get("round")) is not None]
    if rounds:
        s.info.append(("rounds", str(max(rounds))))
    if wall_s is not None:
        s.info.append(("time", format_seconds(float(wall_s))))
    for k, v in (info or {}).items():
        s.info.append((str(k), str(v)))
    if out_dir is not None:
        d = Path(out_dir)
        s.files.append(("run folder", str(d)))
        names = [Path(f) for f in files] if files is not None else [d / n for n in RUN_FILES if (d / n).exists()]
        for p in names:
            p = p if p.is_absolute() or p.parent != Path(".") else d / p
            s.files.append((p.name + ("/" if p.is_dir() else ""), str(p)))
    return s


def _plain(s: Summary) -> str:
    lines = [s.title]
    if s.metrics:
        table = [("metric", "final", "best", "best round"), *s.metrics]
        w = [max(len(r[i]) for r in table) for i in range(4)]
        lines += ["  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in table]
    pairs = s.info + s.files
    if pairs:
        w = max(len(k) for k, _ in pairs)
        lines += [f"  {k.ljust(w)}  {v}" for k, v in pairs]
    return "\n".join(lines) + "\n"


def render(s: Summary, plain: bool | None = None, width: int | None = None, color: bool = False) -> str:
    """The summary as text: rich tables (plain text when ``plain`` or rich is not installed)."""
    if plain is None:
        try:
            import rich  # noqa: F401
        except ImportError:
            plain = True
    if plain:
        return _plain(s)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=width or 100, force_terminal=color, no_color=not color, highlight=False)
    if s.metrics:
        t = Table(title=s.title, title_justify="left")
        t.add_column("metric")
        for c in ("final", "best", "best round"):
            t.add_column(c, justify="right")
        for row in s.metrics:
            t.add_row(*row)
        console.print(t)
    elif s.title:
        console.print(s.title)
    pairs = s.info + s.files
    if pairs:  # plain lines, never wrapped: paths stay whole for copy and paste
        w = max(len(k) for k, _ in pairs)
        for k, v in pairs:
            console.print(f"[bold]{escape(k.ljust(w))}[/bold]  {escape(v)}", soft_wrap=True)
    return buf.getvalue()


def echo_summary(rows: Sequence[Mapping[str, Any]], *, title: str, err: bool = False, **kw: Any) -> Summary:
    """:func:`summarize` + :func:`render`, printed with click (colour only on a terminal)."""
    import shutil
    import sys

    import click

    s = summarize(rows, title=title, **kw)
    stream = sys.stderr if err else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    click.echo(render(s, width=min(shutil.get_terminal_size((100, 20)).columns, 120), color=tty), nl=False, err=err)
    return s


__all__ = ["RUN_FILES", "Summary", "format_seconds", "metric_names", "summarize", "render", "echo_summary"]
