"""Shared scaffolding of the benchmark scripts: machine description, results JSON, CLI exit codes."""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fedlatent.fl.run import write_json
from fedlatent.utils import FedLatentError


def machine_info() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}


def write_results(path: Path, benchmark: str, settings: dict, results: list, t0: float) -> None:
    """Rewrite ``results.json`` after every finished run, so an interrupted sweep keeps what it did."""
    write_json(path, {"benchmark": benchmark, "settings": settings, "results": results,
                      "machine": machine_info(), "total_wall_s": time.perf_counter() - t0})


def run_cli(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main``; a FedLatentError becomes one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except FedLatentError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def plot_comparison(out: Path, results: list[dict], keys: tuple[str, ...]) -> list[Path]:
    """One accuracy-vs-round PNG per configuration (rows grouped by ``keys``), every method's curve on it.

    Reads each run's metrics.csv from its ``out_dir``; returns the written paths.
    """
    from fedlatent.fl.run import plot_curves, read_metrics

    groups: dict[tuple, dict[str, list]] = {}
    for row in results:
        metrics = Path(row.get("out_dir", "")) / "metrics.csv"
        if row.get("final_accuracy") is None or not metrics.is_file():
            continue
        groups.setdefault(tuple(row.get(k) for k in keys), {})[row["method"]] = read_metrics(metrics)
    paths = []
    for key, curves in groups.items():
        name = "_".join(f"{k}{v}" for k, v in zip(keys, key))
        path = out / f"compare_{name}.png"
        plot_curves(curves, path, title=", ".join(f"{k}={v}" for k, v in zip(keys, key)))
        paths.append(path)
    return paths
