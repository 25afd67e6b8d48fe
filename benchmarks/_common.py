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
