"""FedAvg vs DynaFed vs FedDGM on Fashion-MNIST and CIFAR-10 (10 clients, Dirichlet alpha in {0.01, 0.1}),
a cross-architecture table for FedDGM's distilled set, and a batched-vs-looped speed comparison.

Grid: datasets x alphas x {fedavg, dynafed, feddgm}. All methods of a cell share the seed, hence the same
Dirichlet partition, initial weights, client schedule and local-training settings (FLConfig); they differ on the
server only. FedDGM distils through the dataset's built-in generator when ``pretrained/MANIFEST.json`` has a
checkpoint for it on disk, otherwise in pixel space (the table says which). The generator's public split is
removed from the training set of *every* method (so all see the same private data; ``--train-subsample`` then
draws from the private part).

Tables printed and written to ``--out/results.json``:

1. final accuracy per method, the rounds each method needs to reach FedAvg's final accuracy
   ("-" when it never does) and the mean of the last 3 rounds; the curves go to ``--out/curves.png``;
2. cross-architecture: ConvNet-D3, ResNet-18 and VGG-11 trained on FedDGM's exported set vs on a random real
   subset of equal size (``ipc * clients`` real images per class), real test accuracy mean +- std over seeds;
3. ``--speed``: seconds per MTT iteration of all clients, looped vs batched (vmap), and the largest
   difference between the two paths' latents after the timed iterations.

Paper-scale run (GPU)::

    python benchmarks/feddgm.py --device cuda --preset paper --rounds 20 --eval-epochs 300 --speed

Smoke run (tiny, about a minute on a CPU)::

    OMP_NUM_THREADS=1 python benchmarks/feddgm.py --datasets fashion-mnist --alphas 0.1 --rounds 2 \\
        --clients 3 --train-subsample 300 --test-subsample 200 --image-size 16 --model convnet:width=8 \\
        -O iterations=1 -O syn_steps=2 -O ipc=1 -O train_epochs=2 --dynafed-iterations 2 \\
        --eval-archs convnet:width=8 --eval-epochs 2 --eval-seeds 0 --speed --speed-iterations 2 \\
        --out /tmp/feddgm_bench --overwrite
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


from fedlatent.data import load_dataset  # noqa: E402
from _common import _list, default_data_root, subsample, run_cli  # noqa: E402
from fedlatent.fl.run import RunFolder, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-root", default=default_data_root(), help="[env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--datasets", type=_list(str), default=["fashion-mnist", "cifar10"], help="[%(default)s]")
    p.add_argument("--alphas", type=_list(float), default=[0.01, 0.1], help="Dirichlet alphas [%(default)s]")
    p.add_argument("--methods", type=_list(str), default=["fedavg", "dynafed", "feddgm"], help="[%(default)s]")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="FedDGM preset [%(default)s]")
    p.add_argument("--clients", type=int, default=10, help="[%(default)s]")
    p.add_argument("--rounds", type=int, default=10, help="[%(default)s]")
    p.add_argument("--local-epochs", type=int, default=2, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD lr (reference 0.01) [%(default)s]")
    p.add_argument("--momentum", type=float, default=0.0, help="local SGD momentum (reference 0) [%(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="[%(default)s]")
    p.add_argument("--model", default="convnet-d3:width=32", help="global model = surrogate [%(default)s]")
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: native)")
    p.add_argument("--train-subsample", type=int, default=5000, help="training images used (0: all) [%(default)s]")
    p.add_argument("--test-subsample", type=int, default=2000, help="test images used (0: all) [%(default)s]")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE", help="FedDGM option (JSON value)")
    p.add_argument("--dynafed-iterations", type=int, default=100, help="DynaFed synthesis iterations [%(default)s]")
    p.add_argument("--dynafed-ipc", type=int, default=10, help="DynaFed pseudo images per class [%(default)s]")
    p.add_argument("--eval-archs", type=_list(str), default=["convnet-d3", "resnet18", "vgg11"], help="[%(default)s]")
    p.add_argument("--eval-epochs", type=int, default=100, help="cross-architecture training epochs [%(default)s]")
    p.add_argument("--eval-seeds", type=_list(int), default=[0, 1], help="[%(default)s]")
    p.add_argument("--speed", action="store_true", help="also time batched vs looped client distillation")
    p.add_argument("--speed-iterations", type=int, default=5, help="[%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feddgm"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse runs that already have a summary.json (e.g. to add the cross-architecture table later)")
    return p.parse_args(argv)


def feddgm_options(a) -> dict:
    opts = {}
    for text in a.option:
        k, _, v = text.partition("=")
        try:
            opts[k.strip()] = json.loads(v)
        except ValueError:
            opts[k.strip()] = v
    return opts


def rounds_to(rows, target: float) -> int | None:
    for r in rows:
        if r.get("accuracy") is not None and r["accuracy"] >= target - 1e-12:
            return int(r["round"])
    return None


def last_mean(curve, k: int = 3) -> float:
    """Mean accuracy of the last ``k`` evaluated rounds (less noisy than the final round alone)."""
    acc = [a for _, a in curve if a is not None][-k:]
    return sum(acc) / max(1, len(acc))


def speed(data, a, opts: dict) -> dict:
    """Seconds per iteration of all clients' MTT, looped vs batched, on identical distillers."""
    from fedlatent.fl.base import FLConfig, FLContext, Upload
    from fedlatent.distill.batched import distill_clients
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.generators.resolve import default_generator

    gen = opts.get("generator") or default_generator(data.name)
    space = opts.get("space") or ("pixel" if gen is None else None)
    method = {k: v for k, v in opts.items() if k not in ("generator", "space")}
    cfg = FLConfig(clients=a.clients, model=a.model, seed=a.seed, device=a.device).check()
    ctx = FLContext(config=cfg, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size,
                    class_names=list(data.classes), client_sizes=[1] * a.clients, device=a.device,
                    mean=tuple(data.mean), std=tuple(data.std))
    out = {}
    finals = {}
    for batched in (False, True):
        s = FedDGM(generator=gen, space=space, surrogate=a.model, progress=False, save_artifacts=False,
                   **{k: v for k, v in method.items() if k in ("ipc", "syn_steps", "lr_img", "lr_w", "batch_syn")})
        s.setup(ctx)
        start = s.client_payload(1, 0)["params"]
        ups = [Upload(c, {"start": start, "end": start + 0.01 * torch.randn(start.shape, generator=torch.Generator()
                                                                        .manual_seed(c)).to(start)}, 1)
               for c in range(a.clients)]
        ds = s.make_distillers(1, ups)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs, bsz = distill_clients(ds, list(range(a.clients)), a.speed_iterations, batched=batched,
                                    device=a.device, progress=False)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out["batched" if batched else "looped"] = {"s_per_iteration": dt / max(1, a.speed_iterations), "batch": bsz}
        finals[batched] = [torch.cat([p.detach().flatten() for p in d.synthetic.parameters()]) for d in ds]
    out["max_abs_diff"] = max(float((x - y).abs().max()) for x, y in zip(finals[False], finals[True]))
    out["speedup"] = out["looped"]["s_per_iteration"] / out["batched"]["s_per_iteration"]
    out.update(clients=a.clients, iterations=a.speed_iterations, space=space or "default", generator=gen)
    return out


def main(argv=None) -> int:
    from fedlatent.evaluate import evaluate_distilled, real_subset
    from fedlatent.distill.pixels import evaluate_synthetic
    from fedlatent.apps.distill import distill_federated, private_training_data
    from fedlatent.generators.resolve import default_generator
    from fedlatent.fl.run import read_metrics
    from fedlatent.fl.simulation import simulate

    a = parse_args(argv)
    out = Path(a.out)
    if not a.skip_existing:
        RunFolder.check(out, a.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    opts = feddgm_options(a)
    results = {"args": vars(a), "cells": [], "speed": [], "python": platform.python_version(), "torch": torch.__version__}
    common = dict(clients=a.clients, participation=1.0, rounds=a.rounds, local_epochs=a.local_epochs, lr=a.lr,
                  momentum=a.momentum, weight_decay=0.0, batch_size=a.batch_size, model=a.model, partition="dirichlet",
                  seed=a.seed, device=a.device)
    for name in a.datasets:
        data = load_dataset(name, root=a.data_root, resize=a.image_size)
        gen = opts.get("generator") or default_generator(data.name)
        space = opts.get("space") or (None if gen else "pixel")
        # Every method trains on the same data: the training set without the generator's public split.
        data, excluded = private_training_data(data, None if space == "pixel" else gen)
        data = subsample(data, a.train_subsample, a.test_subsample, a.seed)
        for alpha in a.alphas:
            cell = {"dataset": name, "alpha": alpha, "generator": gen, "space": space, "runs": {},
                    "public_split_excluded": excluded, "train": int(len(data.y_train))}
            for method in a.methods:
                run_dir = out / f"{name}-a{alpha}-{method}"
                t0 = time.perf_counter()
                if a.skip_existing and (run_dir / "summary.json").is_file():
                    summ = json.loads((run_dir / "summary.json").read_text())
                    rows = read_metrics(run_dir / "metrics.csv")
                    cell["runs"][method] = {"final": summ["final_accuracy"], "best": summ["best_accuracy"],
                                            "wall_s": summ["wall_s"], "existing": True,
                                            "curve": [(int(r["round"]), r["accuracy"]) for r in rows
                                                      if r.get("accuracy") is not None]}
                    print(f"{name} alpha={alpha} {method}: final {summ['final_accuracy']:.4f} (existing run)", flush=True)
                    continue
                if method == "feddgm":
                    fd_opts = {k: v for k, v in opts.items() if k not in ("generator", "space")}
                    res = distill_federated(data=data, preset=a.preset, out=run_dir, overwrite=a.overwrite or a.skip_existing,
                                            progress=False, exclude_public=False, generator=gen, space=space,
                                            surrogate=a.model,
                                            alpha=alpha, **{**common, **fd_opts})
                    sim = res.simulation
                    cell["space"] = sim.strategy.space  # the resolved latent space (e.g. F2, or pixel)
                elif method == "dynafed":
                    synth = max(3, a.rounds // 2)
                    if synth >= a.rounds:
                        print(f"skip dynafed: needs rounds > {synth}")
                        continue
                    sim = simulate("dynafed", dataset=name, data=data, out=run_dir, overwrite=a.overwrite or a.skip_existing,
                                   progress=False,
                                   method_options={"synth_round": synth, "iterations": a.dynafed_iterations,
                                                   "ipc": a.dynafed_ipc, "progress": False},
                                   **{**common, "alpha": alpha})
                else:
                    sim = simulate(method, dataset=name, data=data, out=run_dir, overwrite=a.overwrite or a.skip_existing,
                                   progress=False,
                                   **{**common, "alpha": alpha})
                rows = read_metrics(run_dir / "metrics.csv")
                cell["runs"][method] = {"final": sim.final_accuracy, "best": sim.best_accuracy,
                                        "wall_s": time.perf_counter() - t0,
                                        "curve": [(int(r["round"]), r["accuracy"]) for r in rows
                                                  if r.get("accuracy") is not None]}
                print(f"{name} alpha={alpha} {method}: final {sim.final_accuracy:.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                write_json(out / "results.json", results | {"cells": results["cells"] + [cell]})
            if "fedavg" in cell["runs"]:
                target = cell["runs"]["fedavg"]["final"]
                for m, r in cell["runs"].items():
                    r["rounds_to_fedavg_final"] = rounds_to([{"round": x, "accuracy": y} for x, y in r["curve"]], target)
            if "feddgm" in cell["runs"] and a.eval_archs:
                path = out / f"{name}-a{alpha}-feddgm" / "distilled.safetensors"
                cross = evaluate_distilled(path, a.eval_archs, data=data, epochs=a.eval_epochs, seeds=a.eval_seeds,
                                           progress=False)
                from fedlatent.export import load_distilled

                ds, _ = load_distilled(path)
                per_class = max(1, len(ds) // data.num_classes)
                xr, yr = real_subset(data, per_class, a.seed)
                real = {arch: evaluate_synthetic(xr, yr, arch, data, epochs=a.eval_epochs, seeds=a.eval_seeds,
                                                 progress=False) for arch in a.eval_archs}
                cell["cross_arch"] = {arch: {"distilled": cross[arch]["mean"], "distilled_std": cross[arch]["std"],
                                             "real": real[arch]["mean"], "real_std": real[arch]["std"],
                                             "images": len(ds)} for arch in a.eval_archs}
            results["cells"].append(cell)
            write_json(out / "results.json", results)
        if a.speed:
            results["speed"].append({"dataset": name, **speed(data, a, {**opts, "generator": gen, "space": space})})
            write_json(out / "results.json", results)
    print_tables(results)
    if results["cells"]:
        plot_cells(results["cells"], out / "curves.png")
        print(f"\naccuracy curves: {out / 'curves.png'}")
    return 0


def plot_cells(cells: list[dict], path: Path) -> None:
    """Accuracy vs round of every method, one panel per (dataset, alpha) cell; PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in cells if c.get("runs")]
    if not cells:
        return
    cols = min(2, len(cells))
    rows = (len(cells) + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, c in enumerate(cells):
        ax = fig.add_subplot(rows, cols, i + 1)
        for m, r in c["runs"].items():
            xs, ys = zip(*[(x, 100 * y) for x, y in r["curve"]])
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{m} ({100 * r['final']:.1f})")
        ax.set_title(f"{c['dataset']}, alpha={c['alpha']}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def print_tables(results: dict) -> None:
    cells = results["cells"]
    if cells:
        methods = list(dict.fromkeys(m for c in cells for m in c["runs"]))
        print("\nFinal accuracy (rounds to FedAvg's final accuracy) [mean of the last 3 rounds]")
        print(f"{'dataset':<14}{'alpha':>6}  {'FedDGM space':<14}" + "".join(f"{m:>30}" for m in methods))
        for c in cells:
            row = f"{c['dataset']:<14}{c['alpha']:>6}  {str(c.get('space') or 'default'):<14}"
            for m in methods:
                r = c["runs"].get(m)
                if r is None:
                    row += f"{'-':>30}"
                    continue
                rt = r.get("rounds_to_fedavg_final")
                row += f"{100 * r['final']:>13.2f} ({'-' if rt is None else rt:>4}) [{100 * last_mean(r['curve']):5.2f}]"
            print(row)
        xs = [c for c in cells if c.get("cross_arch")]
        if xs:
            print("\nCross-architecture: trained on FedDGM's distilled set vs a random real subset of equal size")
            print(f"{'dataset':<14}{'alpha':>6}  {'arch':<22}{'distilled':>18}{'real subset':>18}{'images':>8}")
            for c in xs:
                for arch, r in c["cross_arch"].items():
                    print(f"{c['dataset']:<14}{c['alpha']:>6}  {arch:<22}"
                          f"{100 * r['distilled']:>10.2f} +- {100 * r['distilled_std']:<4.1f}"
                          f"{100 * r['real']:>10.2f} +- {100 * r['real_std']:<4.1f}{r['images']:>8}")
    for s in results.get("speed", []):
        print(f"\nClient distillation speed ({s['dataset']}, {s['clients']} clients, {s['iterations']} iterations): "
              f"looped {s['looped']['s_per_iteration']:.3f} s/it, batched {s['batched']['s_per_iteration']:.3f} s/it "
              f"(batch {s['batched']['batch']}), speedup x{s['speedup']:.2f}, max |diff| {s['max_abs_diff']:.2e}")


if __name__ == "__main__":
    run_cli(main)
