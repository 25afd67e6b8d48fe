"""Offline quality of pretrained generators, side by side, each metric next to its real-vs-real ceiling.

For every dataset: one :class:`fedlatent.generators.quality.QualityEvaluator` (a ConvNet feature classifier trained
on real training images, cached; two disjoint sets of real test images per class; the real GAN-train baseline),
then every generator given for that dataset is measured in the same run:

* class fidelity; per-class precision / recall / density / coverage (Naeem et al., ICML 2020); Frechet distance,
  all in the classifier's feature space;
* GAN-train (Shmelkov et al., ECCV 2018): a fresh ConvNet trained on ``--gan-train-per-class`` generated images
  per class, tested on the real test set, next to the same network and recipe on as many random real images;
* the generator's training time (manifest entry or checkpoint metadata) and a PNG grid (one row per class).

Prints a table and writes a JSON report::

    OMP_NUM_THREADS=1 python benchmarks/generator_quality.py --datasets cifar10 --data-root ../shared/data \\
        --generators cifar10=cifar10,cifar10=path/to/new.safetensors --out benchmarks/results/generator_quality.json

Acceptance targets (CIFAR-10): GAN-train >= 0.8 x real, coverage >= 0.5 x real, fidelity >= 0.8. Smoke test:
``--datasets digits --per-class 10 --classifier-steps 30 --gan-train-epochs 3 --out /tmp/q.json --grid-dir /tmp``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlatent.data import load_dataset  # noqa: E402
from fedlatent.generators import load_generator, read_manifest  # noqa: E402
from fedlatent.generators.builtin import read_builtin_metadata  # noqa: E402
from fedlatent.generators.registry import complete_generator_spec, parse_random_spec  # noqa: E402
from fedlatent.generators.quality import (  # noqa: E402
    QualityConfig, QualityEvaluator, format_quality, save_grid,
)
from fedlatent.utils import atomic_write_text  # noqa: E402

DEFAULT_GENERATORS = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}
TARGETS = {"cifar10": {"gan_train_ratio": 0.8, "coverage_ratio": 0.5, "fidelity": 0.8}}


def generator_record(name: str) -> dict:
    """Training time, steps and sha256 of a manifest name or checkpoint path (what is known)."""
    m = read_manifest()
    if name in m["models"]:
        e = m["models"][name]
        return {"train_seconds": e.get("train_seconds"), "steps": e.get("steps"), "sha256": e.get("sha256"),
                "parameters": e.get("parameters")}
    if name.endswith(".safetensors"):
        from fedlatent.utils import sha256_file

        info = read_builtin_metadata(name)["info"]
        return {"train_seconds": info.get("train_seconds"), "steps": info.get("steps_done"),
                "sha256": sha256_file(name)}
    return {}


def plot_curve(curve: str | Path, png: str | Path, reference: dict | None = None, ref_label: str = "",
               x: str = "minutes") -> Path:
    """Quality against training time (``x="minutes"``) or steps from ``fedlatent pretrain --eval-every`` logs
    (``*.curve.jsonl``; ``curve`` one path or ``LABEL=PATH,LABEL=PATH`` to overlay runs), one panel per metric, the
    real-vs-real ceiling dashed and an optional reference generator's values dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(c.partition("=")[0], c.partition("=")[2]) if "=" in c else ("", c) for c in str(curve).split(",")]
    logs = [(label, [json.loads(t) for t in Path(path).read_text().splitlines() if t.strip()]) for label, path in runs]
    ceiling = next((r["ceiling"] for _, lines in logs for r in lines if "ceiling" in r), {})
    pts = [(label, [r for r in lines if "train_seconds" in r]) for label, lines in logs]
    keys = [k for k in ("fidelity", "coverage", "recall", "precision", "fd", "gan_train")
            if any(k in r for _, rs in pts for r in rs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, rs in pts:
            xs = [r["train_seconds"] / 60 if x == "minutes" else r["step"] for r in rs if k in r]
            ax.plot(xs, [r[k] for r in rs if k in r], "o-", ms=3, label=label or None)
        if k in ceiling:
            ax.axhline(ceiling[k], ls="--", c="gray", lw=1, label="real vs real")
        if reference and reference.get(k) is not None:
            ax.axhline(reference[k], ls=":", c="C3", lw=1.2, label=ref_label or "reference")
        ax.set_title(k)
        ax.set_xlabel("training minutes" if x == "minutes" else "steps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist,fashion-mnist,cifar10")
    ap.add_argument("--generators", default="",
                    help="dataset=name_or_path,... (';' separates when a spec holds commas; a dataset may repeat: "
                         "generators side by side; 'random[:opts]' is an untrained prior; default: its manifest name)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--nearest-k", type=int, default=5)
    ap.add_argument("--psi", type=float, default=1.0, help="truncation psi of the samples")
    ap.add_argument("--classifier", default="convnet:width=64", help="feature classifier (model registry)")
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--gan-train-per-class", type=int, default=100)
    ap.add_argument("--gan-train-arch", default="convnet")
    ap.add_argument("--gan-train-epochs", type=int, default=300, help="0: no GAN-train")
    ap.add_argument("--gan-train-seeds", default="0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-dir", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/results/generator_quality.json")
    ap.add_argument("--curve", default=None, help="plot a pretrain quality log (*.curve.jsonl, or LABEL=PATH,... to "
                                                  "overlay runs) and exit")
    ap.add_argument("--curve-x", choices=["minutes", "steps"], default="minutes")
    ap.add_argument("--curve-png", default="benchmarks/results/generator_curve.png")
    ap.add_argument("--curve-ref", default=None,
                    help="DATASET:NAME from a report of this script (--out) to draw as a reference line")
    ap.add_argument("--curve-ref-json", default="benchmarks/results/generator_quality.json")
    args = ap.parse_args(argv)
    if args.curve:
        ref = None
        if args.curve_ref:
            ds, _, name = args.curve_ref.partition(":")
            ref = json.loads(Path(args.curve_ref_json).read_text())["results"][ds]["generators"][name]
        print(f"wrote {plot_curve(args.curve, args.curve_png, ref, name if ref else '', args.curve_x)}")
        return {}

    chosen: dict[str, list[str]] = {}
    for part in filter(None, args.generators.split(";" if ";" in args.generators else ",")):
        k, _, v = part.partition("=")
        chosen.setdefault(k.strip(), []).append(v.strip())
    cfg = QualityConfig(per_class=args.per_class, nearest_k=args.nearest_k, classifier=args.classifier,
                        classifier_steps=args.classifier_steps, gan_train=args.gan_train_epochs > 0,
                        gan_train_per_class=args.gan_train_per_class, gan_train_arch=args.gan_train_arch,
                        gan_train_epochs=max(1, args.gan_train_epochs),
                        gan_train_seeds=tuple(int(s) for s in args.gan_train_seeds.split(",")),
                        truncation_psi=args.psi, seed=args.seed)
    report = {"settings": vars(args), "config": asdict(cfg), "results": {}}
    tables = []
    for ds in filter(None, args.datasets.split(",")):
        names = chosen.get(ds) or [DEFAULT_GENERATORS.get(ds, ds)]
        gens = []
        fixed = [n for n in names if parse_random_spec(n) is None]
        res = load_generator(fixed[0]).img_resolution if fixed else None
        data = load_dataset(ds, root=args.data_root, resize=res)
        for name in names:
            name = complete_generator_spec(name, data.channels, data.image_size, data.num_classes)
            try:
                gens.append((name, load_generator(name)))
            except Exception as e:  # report and continue
                print(f"[{ds}] {name} skipped: {e}")
                report["results"].setdefault(ds, {}).setdefault("errors", {})[name] = str(e)
        if not gens:
            continue
        t0 = time.time()
        ev = QualityEvaluator(data, cfg, progress=True)
        res = {"real": ev.ceiling, "classifier_test_acc": ev.classifier_test_acc,
               "setup_seconds": round(time.time() - t0, 1), "generators": {}}
        rows = []
        for i, (name, G) in enumerate(gens):
            t1 = time.time()
            r = ev(G)
            r.update(generator_record(name), eval_seconds=round(time.time() - t1, 1))
            grid = Path(args.grid_dir) / (f"generator_{ds}.png" if i == 0 else f"generator_{ds}-{i}.png")
            save_grid(G, grid, data.num_classes, seed=args.seed, psi=args.psi)
            r["grid"] = str(grid)
            if cfg.gan_train:
                r["gan_train_ratio"] = r["gan_train"] / ev.ceiling["gan_train"]
            r["coverage_ratio"] = r["coverage"] / ev.ceiling["coverage"]
            if ds in TARGETS:
                r["targets_met"] = {k: r.get(k, 0) >= v for k, v in TARGETS[ds].items()}
            res["generators"][name] = r
            rows.append((name, r))
        report["results"][ds] = res
        tables.append((ds, rows, ev.ceiling))
    for ds, rows, ceiling in tables:
        print(f"\n[{ds}] (per class {args.per_class}, k={args.nearest_k}, GAN-train {args.gan_train_arch} on "
              f"{args.gan_train_per_class}/class, {args.gan_train_epochs} epochs)")
        print(format_quality(rows, ceiling))
        for name, r in rows:
            extra = f"  train {r.get('train_seconds')} s, {r.get('steps')} steps"
            if "gan_train_ratio" in r:
                extra += f", GAN-train / real {r['gan_train_ratio']:.2f}"
            print(f"  {name}: coverage / real {r['coverage_ratio']:.2f}{extra}")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {args.out}")
    return report


__all__ = ["main", "plot_curve"]

if __name__ == "__main__":
    main()
