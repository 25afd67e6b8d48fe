"""The FedDGM server's multi-client distillation per ``distill_clients`` mode, interleaved, with a results check.

Builds the server of the default CIFAR-10 cell of ``benchmarks/feddgm.py`` (the ``cifar10-cpu`` preset: 10
clients, ConvNet-D3 width 32 surrogate, built-in ``cifar10`` generator, ipc 2, 8 syn_steps, full DSA) on seeded
synthetic client uploads, and times full latent-MTT iterations of all clients (render, meta-gradient, latent
backward, optimiser steps) through :func:`fedlatent.distill.batched.distill_clients`:

* ``loop``: client after client, torch's intra-op threads (``--threads``) on each operator;
* ``loop-1``: the same on one thread (the yardstick of ``threads``' results);
* ``threads``: ``--threads`` clients at a time in worker threads of one intra-op thread each;
* ``grouped``: the clients as one grouped network (``--threads`` intra-op threads).

Every mode starts from the same initial latents; after the timed iterations the script compares each mode's
latents with ``loop-1`` (``threads`` must be bitwise equal) and with ``loop``. Modes alternate within each repeat;
the table gives medians of wall and process CPU time per iteration. Prints a table, writes JSON.

    nice -n 5 python benchmarks/clients_speed.py --threads 2 --repeats 3 --out OUT.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import default_data_root, server_on_uploads  # noqa: E402

MODES = {"loop": False, "loop-1": False, "threads": "threads", "grouped": True}


def build(a):
    """The preset's FedDGM server on the CIFAR-10 shapes, and ``a.clients`` seeded uploads around its surrogate."""
    from fedlatent.apps.distill import PRESETS
    from fedlatent.data import load_dataset
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.generators.resolve import default_generator

    data = load_dataset("cifar10", root=a.data_root)
    preset = PRESETS["cifar10-cpu"]
    opts = dataclasses.asdict(preset.method) | {"generator": default_generator(data.name), "progress": False,
                                                 "save_artifacts": False, "mtt_engine": a.engine}
    cfg = dataclasses.replace(preset.config, clients=a.clients, seed=0, device="cpu").check()
    s = FedDGM(**opts)
    ups = server_on_uploads(s, data, cfg)
    return s, ups, opts


def latents(ds) -> list[torch.Tensor]:
    return [torch.cat([p.detach().flatten() for p in d.synthetic.parameters()]) for d in ds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=default_data_root())
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--engine", default="fast", help="FedDGM mtt_engine [%(default)s, the preset's]")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per mode and repeat [%(default)s]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="loop,loop-1,threads,grouped", help="[%(default)s]")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clients_speed.json"))
    a = p.parse_args()
    from fedlatent.distill.batched import distill_clients
    from fedlatent.distill.mtt import tune_allocator

    tune_allocator()
    torch.set_num_threads(a.threads)
    s, ups, opts = build(a)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    ids = [u.client_id for u in ups]

    def run(mode: str, iterations: int):
        torch.set_num_threads(1 if mode == "loop-1" else a.threads)
        ds = s.make_distillers(1, ups)
        t, c = time.perf_counter(), time.process_time()
        _, width = distill_clients(ds, ids, iterations, batched=MODES[mode], progress=False)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        torch.set_num_threads(a.threads)
        return ds, dt / iterations, dc / iterations, width

    warm = {}
    for m in modes:  # warm-up: compiles a compiled engine's graphs (inductor caches them on disk)
        warm[m] = run(m, 1)[1]
    wall, cpu, final, width = {m: [] for m in modes}, {m: [] for m in modes}, {}, {}
    loads = []
    for _ in range(a.repeats):
        for m in modes:
            ds, dt, dc, width[m] = run(m, a.iterations)
            wall[m].append(dt)
            cpu[m].append(dc)
            final[m] = latents(ds)
        loads.append(os.getloadavg()[0])
        print("  " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in wall.items()), file=sys.stderr, flush=True)

    def diff(m: str, ref: str) -> float | None:
        if ref not in final or m == ref:
            return None
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(final[m], final[ref]))

    med = {m: statistics.median(v) for m, v in wall.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    base = med.get("loop")
    print(f"FedDGM server, cifar10-cpu preset, {a.clients} clients, engine {a.engine}, {a.threads} threads; "
          f"medians of {a.repeats} interleaved repeats of {a.iterations} iterations; load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'mode':8s} {'at once':>7s} {'wall s / iteration':>18s} {'wall / loop':>11s} {'CPU s / iteration':>17s} "
          f"{'max rel diff vs loop-1':>22s} {'vs loop':>9s}")
    for m in modes:
        d1, d0 = diff(m, "loop-1"), diff(m, "loop")
        print(f"{m:8s} {width[m]:7d} {med[m]:18.3f} {(med[m] / base if base else float('nan')):11.2f} "
              f"{med_cpu[m]:17.3f} {('-' if d1 is None else f'{d1:.1e}'):>22s} {('-' if d0 is None else f'{d0:.1e}'):>9s}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "wall": wall, "cpu": cpu, "median": med, "median_cpu": med_cpu, "width": width,
                   "max_rel_diff_vs_loop1": {m: diff(m, "loop-1") for m in modes},
                   "max_rel_diff_vs_loop": {m: diff(m, "loop") for m in modes}, "warm_up_wall_s": warm,
                   "load": loads, "torch": torch.__version__, "threads": a.threads}, f, indent=2)


if __name__ == "__main__":
    main()
