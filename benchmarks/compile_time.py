"""What torch.compile costs the default CIFAR-10 cell on an empty compile cache, and what it buys per call.

Builds the FedDGM server of ``benchmarks/server_profile.py`` (the cell's CPU preset with every engine ``fast``)
and times, in a fresh process on a fresh ``TORCHINDUCTOR_CACHE_DIR``:

* the first latent-MTT step of one client (compiles the rendering, the MTT kernel's forward, its fused
  recompute + R-operator graphs, the rendering's backward) and the second (compiled code only),
* two epochs of server training on the 200-image pool (compiles the training kernel at the pool's batch size)
  and two more,
* one epoch of client training at batch 64 (the training kernel at the clients' batch size) and one more;

and the CPU time of the whole process and its children (inductor's compile workers, gcc). Several checkouts
(``--roots``) run side by side, started together, each importing its own ``fedlatent``: the comparison is made
in one run, on the same machine state. Prints a table, writes JSON.

    OMP_NUM_THREADS=1 nice -n 2 python benchmarks/compile_time.py --data-root ../shared/data \\
        --roots BASELINE_CHECKOUT,. --labels baseline,this --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ["first MTT step", "second MTT step", "server training, first 2 epochs", "server training, 2 more",
          "client epoch, first", "client epoch, again"]


def worker(a: argparse.Namespace) -> None:
    """One checkout, in this process: time the phases, print one JSON line."""
    sys.path.insert(0, str(Path(a.root).resolve()))
    import fedlatent  # noqa: F401 -- from --root, before server_profile puts this checkout on the path
    import torch

    sys.path.insert(1, str(HERE))
    import server_profile as SP
    from fedlatent.distill.mtt import tune_allocator
    from fedlatent.train import engine_loss, fit

    torch.set_num_threads(1)
    tune_allocator()
    ns = argparse.Namespace(data_root=a.data_root, clients=10, model="convnet-d3:width=32", ipc=2, syn_steps=8,
                            engine="fast", mode="exact", render_engine="fast", train_engine="fast")
    s, ups, _ = SP.build(ns)
    ds = s.make_distillers(1, ups)
    out = {}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t

    timed(PHASES[0], ds[0].step)
    timed(PHASES[1], ds[1].step)
    timed(PHASES[2], lambda: SP.profile_train(s, 1))
    timed(PHASES[3], lambda: SP.profile_train(s, 1))
    m = s.model
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32, generator=g), torch.randint(0, 10, (256,), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    lf = engine_loss(m, "fast", 64)
    for name in PHASES[4:]:
        timed(name, lambda: fit(m, x, y, opt, epochs=1, batch_size=64, generator=torch.Generator().manual_seed(0),
                                loss_fn=lf))
    print("RESULT " + json.dumps({"fedlatent": str(Path(fedlatent.__file__).parent), "seconds": out}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("FEDLATENT_DATA", str(HERE.parents[1] / "shared" / "data")))
    p.add_argument("--roots", default=".", help="comma-separated checkouts, run side by side [%(default)s]")
    p.add_argument("--labels", default=None, help="comma-separated names, one per root [the roots]")
    p.add_argument("--out", default=str(HERE / "results" / "compile_time.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=".", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    roots = a.roots.split(",")
    labels = a.labels.split(",") if a.labels else roots
    if len(labels) != len(roots):
        p.error("--labels needs one name per root")
    procs, caches = [], []
    for root in roots:
        cache = tempfile.mkdtemp(prefix="fedlatent-compile-")  # empty: every graph compiles from nothing
        caches.append(cache)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--worker", "--root", root, "--data-root", a.data_root]
        procs.append((time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)))
    pending = {proc.pid: (label, t0, proc) for label, (t0, proc) in zip(labels, procs)}
    done = {}
    while pending:  # whichever ends first: its own wall time and CPU time (with its children's)
        pid, status, ru = os.wait4(-1, 0)
        if pid in pending:
            label, t0, proc = pending.pop(pid)
            done[label] = (proc, status, time.perf_counter() - t0, ru.ru_utime + ru.ru_stime)
    rows = {}
    for label in labels:
        proc, status, wall, cpu = done[label]
        lines = [ln for ln in proc.stdout.read().splitlines() if ln.startswith("RESULT ")]
        if status != 0 or not lines:
            sys.exit(f"error: the run of {label} failed (status {status})")
        rows[label] = dict(json.loads(lines[-1][7:]), wall_s=wall, cpu_s=cpu)
    for c in caches:
        shutil.rmtree(c, ignore_errors=True)
    w = max(len(s) for s in PHASES + ["process CPU (with compile workers, gcc)"]) + 2
    print("seconds, empty compile cache".ljust(w) + "".join(f"{lb:>14}" for lb in labels))
    for ph in PHASES:
        print(ph.ljust(w) + "".join(f"{rows[lb]['seconds'][ph]:14.3f}" for lb in labels))
    print("process wall".ljust(w) + "".join(f"{rows[lb]['wall_s']:14.1f}" for lb in labels))
    print("process CPU (with compile workers, gcc)".ljust(w) + "".join(f"{rows[lb]['cpu_s']:14.1f}" for lb in labels))
    meta = {"machine": os.uname().machine, "cpus": os.cpu_count(), "torch": __import__("torch").__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": os.getloadavg()[0]}
    for lb, r in rows.items():
        print(f"{lb} imported {r.pop('fedlatent')}")  # a path of this machine: shown, not written
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
