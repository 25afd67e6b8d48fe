"""FedDF and FedMD with heterogeneous clients vs homogeneous FedAvg, under Dirichlet label skew.

Grid: datasets x Dirichlet alphas x methods on K clients, all with the same seed. Every method uses
the same public split (``--public-fraction``; FedAvg ignores the public data) and therefore the same
private partition and the same client schedule. FedDF and FedMD clients get mixed architectures
(``--client-models``, seeded assignment); FedAvg trains one ConvNet (``--fedavg-model``). Each run writes
its own run folder under ``--out``; the script prints a table (final accuracy overall and per
architecture, communication) and writes ``--out/results.json`` after every finished run.

Full configuration (the default; hours on a CPU, a GPU recommended)::

    python benchmarks/kd_baselines.py --device auto

A small configuration for a quiet 2-core CPU (estimated 15-20 minutes: fewer samples, narrow ConvNets
of three shapes instead of ResNet-18 / VGG-11, few rounds, short distillation; one CIFAR-10 cell of it
with --distill-steps 100 --subset-size 300 --public-epochs 2 used 8.7 CPU-minutes)::

    python benchmarks/kd_baselines.py --datasets fashion-mnist,cifar10 --alphas 0.1,1.0 --rounds 5 \\
        --train-subsample 3000 --test-subsample 1000 --public-fraction 0.1 \\
        --client-models "convnet:width=32@0.5;convnet:width=16,depth=2@0.3;convnet:width=32,depth=1@0.2" \\
        --fedavg-model convnet:width=32 --distill-steps 50 --subset-size 200 --public-epochs 1

Server-side distillation dominates FedDF's cost (``--distill-steps`` x ``--distill-batch-size`` samples per
architecture and round); FedMD's is pre-training (``--public-epochs``) plus digest + revisit per round.

Smoke test (well under a minute)::

    python benchmarks/kd_baselines.py --datasets fashion-mnist --alphas 1.0 --clients 3 --rounds 1 \\
        --train-subsample 300 --test-subsample 200 --client-models "convnet:width=8@0.5;convnet:width=4,depth=2@0.5" \\
        --fedavg-model convnet:width=8 --distill-steps 10 --subset-size 50 --public-epochs 1 --out /tmp/kdb --overwrite
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):  # allow `python benchmarks/kd_baselines.py` from a source checkout
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


from _common import (_list, datasets_of, default_data_root, format_table, open_sweep,  # noqa: E402
                     plot_comparison, run_cli, run_sweep, simulation_row)
from fedlatent.fl.simulation import simulate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the full, small and smoke configurations.")
    p.add_argument("--data-root", default=default_data_root(), help="dataset folder [env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--datasets", type=_list(str), default=["cifar10", "fashion-mnist"], help="comma list [%(default)s]")
    p.add_argument("--alphas", type=_list(float), default=[0.1, 1.0], help="comma list of Dirichlet alphas [%(default)s]")
    p.add_argument("--methods", type=_list(str), default=["fedavg", "feddf", "fedmd"], help="comma list [%(default)s]")
    p.add_argument("--clients", type=int, default=10, help="[%(default)s]")
    p.add_argument("--client-models", default="convnet@0.5;resnet18@0.3;vgg11@0.2",
                   help="architectures of the FedDF / FedMD clients (SPEC@FRACTION;...) [%(default)s]")
    p.add_argument("--fedavg-model", default="convnet", help="FedAvg's (homogeneous) architecture [%(default)s]")
    p.add_argument("--partition", default="dirichlet", choices=["dirichlet", "balanced-dirichlet"],
                   help="Dirichlet split flavour [%(default)s]")
    p.add_argument("--min-size", type=int, default=10, help="dirichlet: minimum client size [%(default)s]")
    p.add_argument("--public-fraction", type=float, default=0.1,
                   help="public split of the training set (FedDF transfer set, FedMD public data) [%(default)s]")
    p.add_argument("--rounds", type=int, default=30, help="communication rounds [%(default)s]")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of clients per round [%(default)s]")
    p.add_argument("--local-epochs", type=int, default=1, help="local (FedMD: revisit) epochs [%(default)s]")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD lr [%(default)s]")
    p.add_argument("--batch-size", type=int, default=32, help="[%(default)s]")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every k rounds (+ first/last) [%(default)s]")
    p.add_argument("--distill-steps", type=int, default=500, help="FedDF server distillation steps [%(default)s]")
    p.add_argument("--distill-batch-size", type=int, default=64, help="FedDF [%(default)s]")
    p.add_argument("--transfer-size", type=int, default=0, help="FedDF: subsample the transfer set (0: all)")
    p.add_argument("--subset-size", type=int, default=500, help="FedMD public subset per round [%(default)s]")
    p.add_argument("--public-epochs", type=int, default=2, help="FedMD pre-training epochs on public data [%(default)s]")
    p.add_argument("--private-epochs", type=int, default=1, help="FedMD pre-training epochs on private data [%(default)s]")
    p.add_argument("--digest-epochs", type=int, default=1, help="FedMD digest epochs [%(default)s]")
    p.add_argument("--train-subsample", type=int, default=0, help="use this many training images (0: all)")
    p.add_argument("--test-subsample", type=int, default=0, help="use this many test images (0: all)")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto [%(default)s]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "kd_baselines"), help="output folder [%(default)s]")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing output folder, replacing its runs")
    p.add_argument("--skip-existing", action="store_true", help="keep runs that already have a summary.json")
    p.add_argument("--progress", action="store_true", help="per-run progress bars")
    return p.parse_args(argv)


def method_setup(a: argparse.Namespace, method: str) -> tuple[dict, dict]:
    """(method options, extra FLConfig fields) of one method."""
    if method == "feddf":
        opts = {"distill_steps": a.distill_steps, "distill_batch_size": a.distill_batch_size,
                "transfer_size": a.transfer_size or None}
        return opts, {"client_models": a.client_models, "model": a.fedavg_model}
    if method == "fedmd":
        opts = {"subset_size": a.subset_size, "public_epochs": a.public_epochs, "private_epochs": a.private_epochs,
                "digest_epochs": a.digest_epochs}
        return opts, {"client_models": a.client_models, "model": a.fedavg_model}
    return {}, {"model": a.fedavg_model}


def table(rows: list[dict]) -> str:
    head = ["dataset", "alpha", "method", "final acc", "best acc", "per architecture (final)", "up MB", "down MB",
            "wall s", "note"]
    body = []
    for r in rows:
        per = r.get("final_accuracy_per_model") or {}
        body.append([
            r["dataset"], f"{r['alpha']:g}", r["method"],
            "-" if r.get("final_accuracy") is None else f"{100 * r['final_accuracy']:.2f}",
            "-" if r.get("best_accuracy") is None else f"{100 * r['best_accuracy']:.2f}",
            " ".join(f"{k}={100 * v:.1f}" for k, v in per.items()) or "-",
            "-" if r.get("uplink_bytes") is None else f"{r['uplink_bytes'] / 1e6:.3f}",
            "-" if r.get("downlink_bytes") is None else f"{r['downlink_bytes'] / 1e6:.3f}",
            "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}",
            (r.get("error") or r.get("note") or "")[:60],
        ])
    return format_table(head, body)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = open_sweep(a.out, a.overwrite, a.skip_existing)
    settings = dict(vars(a))
    t0 = time.perf_counter()

    def cells():
        for ds, data in datasets_of(a):
            for alpha in a.alphas:
                for method in a.methods:
                    yield {"dataset": ds, "alpha": alpha, "method": method}, out / f"{ds}_a{alpha:g}_{method}", data

    def run_one(row, run_dir, data):
        method = row["method"]
        opts, extra = method_setup(a, method)
        out_row = simulation_row(simulate(
            method=method, data=data, out=run_dir, overwrite=True, progress=a.progress,
            method_options=opts, run_info={"benchmark": "kd_baselines", "dataset_name": row["dataset"]},
            clients=a.clients, partition=a.partition, alpha=row["alpha"], min_size=a.min_size,
            rounds=a.rounds, participation=a.participation, local_epochs=a.local_epochs, lr=a.lr,
            batch_size=a.batch_size, eval_every=a.eval_every, seed=a.seed, device=a.device,
            public_fraction=a.public_fraction, **extra))
        out_row["client_models"] = extra.get("client_models")
        return out_row

    def line(row):
        if row.get("final_accuracy") is None:
            return f"  alpha={row['alpha']:g} {row['method']}: error: {row.get('error')}"
        per = row.get("final_accuracy_per_model") or {}
        return (f"  alpha={row['alpha']:g} {row['method']}: final {100 * row['final_accuracy']:.2f}% "
                + (f"({', '.join(f'{k} {100 * v:.1f}%' for k, v in per.items())}) " if per else "")
                + f"up {row['uplink_bytes'] / 1e6:.3f} MB down {row['downlink_bytes'] / 1e6:.3f} MB {row['wall_s']:.1f}s")

    results = run_sweep(cells(), run_one, line, out=out, benchmark="kd_baselines", settings=settings,
                        skip_existing=a.skip_existing, t0=t0)
    print()
    print(table(results))
    for path in plot_comparison(out, results, ("dataset", "alpha")):
        print(f"plot: {path}")
    print(f"\nresults: {out / 'results.json'}  (total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
