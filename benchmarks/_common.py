"""Shared scaffolding of the benchmark scripts: argparse list types, the data root, seeded subsets, machine
description, results JSON, comparison plots and CLI exit codes. The scripts import from here, never from each
other."""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from fedlatent.data import ImageData  # noqa: E402
from fedlatent.fl.run import write_json  # noqa: E402
from fedlatent.utils import FedLatentError, numpy_rng  # noqa: E402


def _list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from None
    return parse


def default_data_root() -> str:
    return os.environ.get("FEDLATENT_DATA") or str((ROOT / ".." / "shared" / "data").resolve())


def subsample(data: ImageData, n_train: int | None, n_test: int | None, seed: int) -> ImageData:
    """A seeded random subset of the train / test sets (None or 0: keep everything)."""
    def pick(n_total: int, n: int | None, key: str) -> torch.Tensor | None:
        if not n or n >= n_total:
            return None
        return torch.from_numpy(np.sort(numpy_rng(seed, "subsample", data.name, key).choice(n_total, n, replace=False)))

    tr, te = pick(len(data.y_train), n_train, "train"), pick(len(data.y_test), n_test, "test")
    return dataclasses.replace(
        data,
        x_train=data.x_train if tr is None else data.x_train[tr], y_train=data.y_train if tr is None else data.y_train[tr],
        x_test=data.x_test if te is None else data.x_test[te], y_test=data.y_test if te is None else data.y_test[te],
    )


def server_on_uploads(strategy, data: ImageData, config, scale: float = 0.01):
    """``strategy`` set up as the server of ``config.clients`` clients on ``data``'s shapes, and one seeded
    synthetic upload per client: start = the surrogate it sends in round 1, end = start + ``scale`` * N(0, 1)
    (client c's noise from seed c). For timing the server without running the clients."""
    from fedlatent.fl.base import FLContext, Upload

    ctx = FLContext(config=config, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size,
                    class_names=list(data.classes), client_sizes=[1] * config.clients, device=config.device,
                    mean=tuple(data.mean), std=tuple(data.std))
    strategy.setup(ctx)
    start = strategy.client_payload(1, 0)["params"]
    noise = [torch.randn(start.shape, generator=torch.Generator().manual_seed(c)) for c in range(config.clients)]
    return [Upload(c, {"start": start, "end": start + scale * n.to(start)}, 1) for c, n in enumerate(noise)]


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


def key_value(text: str) -> tuple[str, object]:
    """argparse type of ``-O KEY=VALUE`` (the command line's one parser: JSON values, dashes as underscores)."""
    from fedlatent.cli._options import parse_key_value

    try:
        return parse_key_value(text, "-O")
    except FedLatentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def num(v, spec: str = ".2f", scale: float = 1.0) -> str:
    """``format(scale * v, spec)``, or "-" for a missing value."""
    return "-" if v is None else format(scale * v, spec)


def format_table(head: list[str], body: list[list[str]]) -> str:
    """Columns aligned with two spaces, a dashed rule under the header (what every benchmark prints)."""
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * n for n in w]), *map(fmt, body)])


def open_sweep(out: str | Path, overwrite: bool, skip_existing: bool) -> Path:
    """The sweep's output folder: created; an earlier sweep's non-empty folder is refused unless ``overwrite`` /
    ``skip_existing``."""
    from fedlatent.fl.run import RunFolder

    out = Path(out)
    if not (overwrite or skip_existing):
        RunFolder.check(out)  # never clobber an earlier sweep
    out.mkdir(parents=True, exist_ok=True)
    return out


def datasets_of(a, resize: int | None = None):
    """``(name, data)`` of every ``--datasets`` entry: loaded from ``--data-root``, subsampled (``--train-subsample``,
    ``--test-subsample``, ``--seed``), announced on stdout."""
    from fedlatent.data import load_dataset

    for ds in a.datasets:
        data = subsample(load_dataset(ds, root=a.data_root, **({"resize": resize} if resize else {})),
                         a.train_subsample, a.test_subsample, a.seed)
        print(f"# {ds}: {len(data.y_train)} train / {len(data.y_test)} test images, "
              f"{data.channels}x{data.image_size}x{data.image_size}", flush=True)
        yield ds, data


def simulation_row(res) -> dict:
    """A finished simulation's summary for a sweep row (without the per-upload rejections)."""
    s = res.summary()
    s.pop("rejections", None)
    return s


def run_sweep(cells, run_one: Callable, line: Callable[[dict], str], *, out: Path, benchmark: str, settings: dict,
              skip_existing: bool, t0: float) -> list[dict]:
    """The sweep loop of the benchmark scripts.

    ``cells`` yields ``(row, run_dir, context)``: the row's identifying columns (dataset, alpha, method, ...), the
    run folder and what ``run_one(row, run_dir, context) -> dict`` needs (e.g. the loaded data). A run whose
    folder already has a summary.json is reused with ``skip_existing``; a FedLatentError becomes the row's
    ``error``. After every cell: ``line(row)`` is printed and results.json rewritten (an interrupted sweep keeps
    what it did). Returns the rows.
    """
    import json

    results: list[dict] = []
    for base, run_dir, context in cells:
        row = {**base, "out_dir": str(run_dir)}
        if skip_existing and (run_dir / "summary.json").is_file():
            row.update(json.loads((run_dir / "summary.json").read_text()))
            row["note"] = "existing"
        else:
            try:
                row.update(run_one(row, run_dir, context))
            except FedLatentError as e:
                row["error"] = str(e)
        row["method"], row["out_dir"] = base["method"], str(run_dir)
        results.append(row)
        print(line(row), flush=True)
        write_results(out / "results.json", benchmark, settings, results, t0)
    return results


def accuracy_line(row: dict, prefix: str) -> str:
    """``prefix: final x%  best y%  t s`` (or the error) for a sweep's progress output."""
    if row.get("final_accuracy") is None:
        return f"{prefix}: error: {row.get('error')}"
    return (f"{prefix}: final {100 * row['final_accuracy']:.2f}%  best {100 * row['best_accuracy']:.2f}%  "
            f"{row['wall_s']:.1f}s")
