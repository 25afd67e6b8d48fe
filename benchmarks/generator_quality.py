"""Class fidelity of pretrained generators: how often a classifier trained on real data recognises the class.

For each dataset: train (or load from the cache) a ConvNet-D3 (width 64 by default, for CPU speed) on real
training images, sample ``--per-class`` images of every class from the generator, and report the fraction
classified as the class they were generated for (overall and per class), the classifier's own test accuracy,
the generator's training time (from its manifest entry / checkpoint metadata) and a PNG grid (one row per
class). Writes a JSON report.

    OMP_NUM_THREADS=1 python benchmarks/generator_quality.py --datasets digits,mnist,fashion-mnist,cifar10 \
        --data-root ../shared/data --psi 1.0,0.7 --classifier-steps 800 \
        --out benchmarks/results/generator_quality.json

Targets: MNIST / Fashion-MNIST >= 85 %, CIFAR-10 >= 50 % (report). Smoke test: ``--datasets digits
--per-class 4 --classifier-steps 20 --out /tmp/q.json --grid-dir /tmp``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlatent.data import load_dataset, normalize  # noqa: E402
from fedlatent.generators import load_generator, read_manifest  # noqa: E402
from fedlatent.generators.builtin import read_builtin_metadata  # noqa: E402
from fedlatent.models import get_model  # noqa: E402
from fedlatent.utils import atomic_write_text, torch_generator  # noqa: E402

DEFAULT_GENERATORS = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}
TARGETS = {"mnist": 0.85, "fashion-mnist": 0.85, "cifar10": 0.50}


def train_classifier(data, arch: str, n_train: int, steps: int, seed: int, cache: Path | None):
    """A classifier (default ConvNet-D3, width 64): ``steps`` SGD steps (batch 128) on a seeded real subset.

    Cached by dataset / size / steps / seed, so repeated benchmark runs do not retrain it.
    """
    model = get_model(arch, data.channels, data.num_classes, data.image_size)
    n_train = min(n_train, len(data.y_train)) if n_train > 0 else len(data.y_train)
    tag = arch.replace(":", "-").replace("=", "").replace(",", "-")
    key = f"{data.name}-{data.image_size}px-{tag}-n{n_train}-steps{steps}-s{seed}.pt"
    if cache is not None and (cache / key).is_file():
        model.load_state_dict(torch.load(cache / key, map_location="cpu", weights_only=True))
        return model.eval(), 0.0, True
    g = torch_generator(seed, "bench-classifier")
    idx = torch.randperm(len(data.y_train), generator=g)[:n_train]
    x, y = data.x_train[idx], data.y_train[idx]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    t0 = time.time()
    model.train()
    for _ in tqdm(range(steps), desc=f"classifier {data.name}", leave=False):
        b = torch.randint(0, len(y), (128,), generator=g)
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache / key)
    return model, time.time() - t0, False


@torch.no_grad()
def accuracy(model, x, y, bs: int = 512) -> float:
    return sum((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item() for i in range(0, len(y), bs)) / len(y)


def generator_train_seconds(name: str) -> float | None:
    m = read_manifest()
    if name in m["models"]:
        return m["models"][name].get("train_seconds")
    if name.endswith(".safetensors"):
        return read_builtin_metadata(name)["info"].get("train_seconds")
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,mnist,fashion-mnist,cifar10")
    ap.add_argument("--generators", default="", help="dataset=name_or_path,... (default: manifest names)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--psi", default="1.0", help="truncation values, comma separated (e.g. 1.0,0.7)")
    ap.add_argument("--classifier-train", type=int, default=0, help="real training images for the classifier (0: all)")
    ap.add_argument("--classifier-steps", type=int, default=400, help="SGD steps (batch 128) for the classifier")
    ap.add_argument("--classifier", default="convnet-d3:width=64", help="classifier architecture (model registry)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/fedlatent-bench-classifiers")
    ap.add_argument("--grid-dir", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/results/generator_quality.json")
    args = ap.parse_args(argv)

    gens = dict(DEFAULT_GENERATORS)
    for part in filter(None, args.generators.split(",")):
        k, _, v = part.partition("=")
        gens[k.strip()] = v.strip()
    psis = [float(p) for p in args.psi.split(",")]
    report = {"settings": vars(args), "results": {}}
    rows = []
    for ds in filter(None, args.datasets.split(",")):
        name = gens.get(ds, ds)
        try:
            G = load_generator(name)
        except Exception as e:  # report and continue with the next dataset
            print(f"[{ds}] skipped: {e}")
            report["results"][ds] = {"generator": name, "error": str(e)}
            continue
        data = load_dataset(ds, root=args.data_root, resize=G.img_resolution)
        clf, clf_s, cached = train_classifier(data, args.classifier, args.classifier_train, args.classifier_steps,
                                              args.seed, Path(args.cache_dir) if args.cache_dir else None)
        test_acc = accuracy(clf, data.x_test, data.y_test)
        labels = torch.arange(G.c_dim).repeat_interleave(args.per_class)
        res = {"generator": name, "classifier": args.classifier, "classifier_test_acc": test_acc,
               "classifier_train_seconds": round(clf_s, 1),
               "classifier_cached": cached, "generator_train_seconds": generator_train_seconds(name),
               "resolution": G.img_resolution, "per_class_samples": args.per_class, "by_psi": {}}
        for psi in psis:
            g = torch_generator(args.seed, "bench-samples", ds)
            t0 = time.time()
            with torch.no_grad():
                imgs = torch.cat([G.to_unit(G.sample(labels[i:i + 256], generator=g, truncation_psi=psi))
                                  for i in range(0, len(labels), 256)])
            gen_s = time.time() - t0
            x = normalize(imgs.clamp(0, 1), data.mean, data.std)
            with torch.no_grad():
                pred = torch.cat([clf(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
            ok = (pred == labels).float()
            per_class = [round(ok[labels == c].mean().item(), 3) for c in range(G.c_dim)]
            res["by_psi"][str(psi)] = {"class_fidelity": round(ok.mean().item(), 4), "per_class": per_class,
                                       "sampling_seconds": round(gen_s, 2)}
            if psi == psis[0]:
                from torchvision.utils import save_image

                grid = Path(args.grid_dir) / f"generator_{ds}.png"
                grid.parent.mkdir(parents=True, exist_ok=True)
                show = torch.cat([imgs[labels == c][:10] for c in range(G.c_dim)])
                save_image(F.interpolate(show, scale_factor=2, mode="nearest"), grid, nrow=10, padding=1)
                res["grid"] = str(grid)
            rows.append((ds, name, psi, ok.mean().item(), test_acc, TARGETS.get(ds)))
        report["results"][ds] = res
    print(f"{'dataset':14s} {'generator':16s} {'psi':>4s} {'fidelity':>8s} {'clf acc':>7s} {'target':>6s}")
    for ds, name, psi, fid, acc, tgt in rows:
        t = "" if tgt is None else f"{tgt:.2f}"
        print(f"{ds:14s} {str(name)[:16]:16s} {psi:4.2f} {fid:8.3f} {acc:7.3f} {t:>6s}")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
