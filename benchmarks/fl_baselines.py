"""FedAvg vs FedProx on Fashion-MNIST and CIFAR-10 under Dirichlet label skew.

Grid: datasets x client counts x Dirichlet alphas x methods, every run with the same seed, so
every method sees the same partition and the same clients in every round. Each run writes its own
run folder (config.json, metrics.csv, accuracy.png, partition.csv/png, summary.json) under
``--out``; the script prints a table (final / best test accuracy, wall time) and writes
``--out/results.json`` after every finished run (so an interrupted sweep keeps what it did).

Full configuration (the default; hours on a CPU, minutes on a GPU)::

    python benchmarks/fl_baselines.py --device auto

A small configuration for a quiet 2-core CPU (about 10-20 minutes; fewer samples, a narrower
ConvNet-D3, fewer rounds)::

    python benchmarks/fl_baselines.py --datasets fashion-mnist --clients 10 --alphas 0.1,0.5 \\
        --rounds 10 --train-subsample 3000 --test-subsample 1000 --model convnet-d3:width=32

Smoke test (seconds)::

    python benchmarks/fl_baselines.py --datasets fashion-mnist --clients 3 --alphas 0.5 --rounds 1 \\
        --train-subsample 300 --test-subsample 200 --model convnet-d3:width=16 --out /tmp/flb --overwrite

Partition: ``balanced-dirichlet`` by default (DynaFed's split; every client the same size). The plain
``dirichlet`` scheme cannot give 20 clients ``min_size`` samples each at alpha = 0.01 on 10 classes
(nearly every class lands on one client), so with ``--partition dirichlet`` such cells are reported as
errors and the sweep goes on.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/fl_baselines.py` from a source checkout
    sys.path.insert(0, str(ROOT))

from _common import (_list, accuracy_line, datasets_of, default_data_root, open_sweep,  # noqa: E402
                     plot_comparison, run_cli, run_sweep, simulation_row, format_table)
from fedlatent.fl.simulation import simulate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the full, small and smoke configurations.")
    p.add_argument("--data-root", default=default_data_root(), help="dataset folder [env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--datasets", type=_list(str), default=["fashion-mnist", "cifar10"], help="comma list [%(default)s]")
    p.add_argument("--clients", type=_list(int), default=[10, 20], help="comma list of client counts [%(default)s]")
    p.add_argument("--alphas", type=_list(float), default=[0.01, 0.1, 0.5], help="comma list of Dirichlet alphas [%(default)s]")
    p.add_argument("--methods", type=_list(str), default=["fedavg", "fedprox"], help="comma list [%(default)s]")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx mu [%(default)s]")
    p.add_argument("--partition", default="balanced-dirichlet", choices=["dirichlet", "balanced-dirichlet"],
                   help="Dirichlet split flavour [%(default)s]")
    p.add_argument("--min-size", type=int, default=10, help="dirichlet: minimum client size [%(default)s]")
    p.add_argument("--rounds", type=int, default=50, help="communication rounds [%(default)s]")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of clients per round [%(default)s]")
    p.add_argument("--local-epochs", type=int, default=1, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD lr [%(default)s]")
    p.add_argument("--batch-size", type=int, default=32, help="[%(default)s]")
    p.add_argument("--model", default="convnet-d3", help="architecture spec [%(default)s]")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every k rounds (+ first/last) [%(default)s]")
    p.add_argument("--train-subsample", type=int, default=0, help="use this many training images (0: all)")
    p.add_argument("--test-subsample", type=int, default=0, help="use this many test images (0: all)")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto [%(default)s]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fl_baselines"), help="output folder [%(default)s]")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing output folder, replacing its runs")
    p.add_argument("--skip-existing", action="store_true", help="keep runs that already have a summary.json")
    p.add_argument("--progress", action="store_true", help="per-run progress bars")
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    head = ["dataset", "clients", "alpha", "method", "final acc", "best acc", "wall s", "uplink MB", "note"]
    body = [[r["dataset"], str(r["clients"]), f"{r['alpha']:g}", r["method"],
             "-" if r.get("final_accuracy") is None else f"{100 * r['final_accuracy']:.2f}",
             "-" if r.get("best_accuracy") is None else f"{100 * r['best_accuracy']:.2f}",
             "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}",
             "-" if r.get("uplink_bytes") is None else f"{r['uplink_bytes'] / 1e6:.1f}",
             (r.get("error") or "")[:60]] for r in rows]
    return format_table(head, body)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = open_sweep(a.out, a.overwrite, a.skip_existing)
    settings = {k: v for k, v in vars(a).items()}
    t0 = time.perf_counter()

    def cells():
        for ds, data in datasets_of(a):
            for k in a.clients:
                for alpha in a.alphas:
                    for method in a.methods:
                        yield ({"dataset": ds, "clients": k, "alpha": alpha, "method": method},
                               out / f"{ds}_K{k}_a{alpha:g}_{method}", data)

    def run_one(row, run_dir, data):
        method = row["method"]
        return simulation_row(simulate(
            method=method, data=data, out=run_dir, overwrite=True, progress=a.progress,
            method_options={"mu": a.mu} if method == "fedprox" else {},
            run_info={"benchmark": "fl_baselines", "dataset_name": row["dataset"]},
            clients=row["clients"], partition=a.partition, alpha=row["alpha"], min_size=a.min_size, rounds=a.rounds,
            participation=a.participation, local_epochs=a.local_epochs, lr=a.lr, batch_size=a.batch_size,
            model=a.model, eval_every=a.eval_every, seed=a.seed, device=a.device))

    results = run_sweep(cells(), run_one, lambda r: accuracy_line(r, f"  K={r['clients']} alpha={r['alpha']:g} "
                                                                     f"{r['method']}"),
                        out=out, benchmark="fl_baselines", settings=settings, skip_existing=a.skip_existing, t0=t0)
    print()
    print(table(results))
    for path in plot_comparison(out, results, ("dataset", "clients", "alpha")):
        print(f"plot: {path}")
    print(f"\nresults: {out / 'results.json'}  (total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
