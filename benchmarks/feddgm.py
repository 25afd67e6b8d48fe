"""The FedDGM grid: FedAvg (plain SGD and the reference's momentum 0.9), DynaFed, FedDGM (hard or learned soft
labels, any latent space), the hybrid FedDGM+avg and the centralised upper bound, on Fashion-MNIST and CIFAR-10
(10 clients, Dirichlet alpha), over seeds; the premise check and the cross-architecture transfer of every
distilled set; and a batched-vs-looped speed comparison.

Every method of a (dataset, alpha, seed) cell shares the seed, hence the same Dirichlet partition, initial weights,
client schedule and local-training settings (FLConfig); they differ on the server only. FedDGM distils through
the dataset's built-in generator when ``pretrained/MANIFEST.json`` has a checkpoint for it on disk, otherwise in
pixel space. The generator's public split is removed from the training set of *every* method (so all see the same
private data; ``--train-subsample`` then draws from the private part).

Methods (``--methods``, comma-separated):

- ``fedavg`` (local SGD momentum ``--momentum``, default 0 as FedDG's clients), ``fedavg-m`` (momentum 0.9, the
  reference's FedAvg baseline), ``dynafed``, ``centralised`` (:mod:`fedlatent.fl.centralised`);
- ``feddgm``, ``feddgm+avg`` (the hybrid), each optionally with ``-soft`` (learned soft labels) and ``@SPACE``
  (latent space ``F<k>``, ``W+`` or ``pixel``), e.g. ``feddgm-soft@F0``. Their options: ``--preset`` then ``-O``.

Tables printed and written to ``--out/results.json`` (rewritten after every run; ``--skip-existing`` reuses
finished runs, so the grid can run in parts):

1. final accuracy (mean ± std over ``--seeds``) and the mean of the last 3 rounds, per method; curves in
   ``--out/curves.png``;
2. the premise check of every FedDGM-family run (:mod:`fedlatent.apps.premise`); with ``--premise-every-round``
   also after each round, on that round's pool (the record's ``premise_rounds``, the run's ``premise_rounds.png``);
3. cross-architecture (``--eval-archs``): fresh networks trained on each distilled set vs a random real subset of
   equal size;
4. ``--speed``: seconds per MTT iteration of all clients, looped vs batched.

Paper-scale run (GPU)::

    python benchmarks/feddgm.py --device cuda --preset paper --rounds 20 --local-epochs 20 --eval-epochs 300

Smoke run (tiny, about a minute on a CPU)::

    OMP_NUM_THREADS=1 python benchmarks/feddgm.py --datasets fashion-mnist --alphas 0.1 --seeds 0 --rounds 2 \\
        --clients 3 --train-subsample 300 --test-subsample 200 --image-size 16 --model convnet:width=8 \\
        -O iterations=1 -O syn_steps=2 -O ipc=1 -O train_epochs=2 --dynafed-iterations 2 --premise-epochs 2 \\
        --eval-archs convnet:width=8 --eval-epochs 2 --speed --speed-iterations 2 --out /tmp/feddgm_bench --overwrite
"""
from __future__ import annotations

import argparse
import dataclasses
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
from _feddgm_report import plot_cells, print_tables  # noqa: E402
from fedlatent.fl.run import RunFolder, write_json  # noqa: E402
from fedlatent.utils import FedLatentError  # noqa: E402

BASE_METHODS = ("fedavg", "fedavg-m", "dynafed", "centralised", "feddgm", "feddgm+avg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-root", default=default_data_root(), help="[env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--datasets", type=_list(str), default=["fashion-mnist", "cifar10"], help="[%(default)s]")
    p.add_argument("--alphas", type=_list(float), default=[0.01, 0.1, 0.5], help="Dirichlet alphas [%(default)s]")
    p.add_argument("--seeds", type=_list(int), default=[0, 1], help="[%(default)s]")
    p.add_argument("--methods", type=_list(str),
                   default=["fedavg", "fedavg-m", "dynafed", "feddgm", "feddgm+avg", "centralised"], help="[%(default)s]")
    p.add_argument("--preset", choices=["auto", "cpu", "cifar10-cpu", "paper"], default="auto",
                   help="FedDGM preset (auto: cifar10-cpu on CIFAR-10, cpu otherwise) [%(default)s]")
    p.add_argument("--clients", type=int, default=10, help="[%(default)s]")
    p.add_argument("--rounds", type=int, default=10, help="[%(default)s]")
    p.add_argument("--local-epochs", type=int, default=2, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD lr (reference 0.01) [%(default)s]")
    p.add_argument("--momentum", type=float, default=0.0, help="local SGD momentum of fedavg and the distillation "
                   "methods (reference 0) [%(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="[%(default)s]")
    p.add_argument("--model", default="convnet-d3:width=32", help="global model = surrogate [%(default)s]")
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: native)")
    p.add_argument("--train-subsample", type=int, default=5000, help="training images used (0: all) [%(default)s]")
    p.add_argument("--test-subsample", type=int, default=2000, help="test images used (0: all) [%(default)s]")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE", help="FedDGM option (JSON value)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE;...",
                   help="a named method variant for --methods, e.g. 'pool-all=feddgm:pool=\"all\"' or "
                        "'le5=feddgm-soft:local_epochs=5;lr_img=300' (FLConfig fields or method options, JSON values)")
    p.add_argument("--dynafed-iterations", type=int, default=100, help="DynaFed synthesis iterations [%(default)s]")
    p.add_argument("--dynafed-ipc", type=int, default=10, help="DynaFed pseudo images per class [%(default)s]")
    p.add_argument("--premise-epochs", type=int, default=300, help="premise check epochs (0: skip) [%(default)s]")
    p.add_argument("--premise-seeds", type=int, default=1, help="fresh networks per premise set, seeded the run's "
                   "seed, then seed + 1000 k: more of them give the (a) - (b) difference a std [%(default)s]")
    p.add_argument("--premise-every-round", action="store_true", help="FedDGM-family runs: also check the premise "
                   "after every round, on that round's pool against its initial latents (no real subset), into the "
                   "record's premise_rounds and the run's premise_rounds.png")
    p.add_argument("--eval-archs", type=_list(str), default=["convnet-d3", "resnet18", "vgg11", "alexnet"],
                   help="cross-architecture transfer of each distilled set ('' to skip) [%(default)s]")
    p.add_argument("--eval-epochs", type=int, default=100, help="cross-architecture training epochs [%(default)s]")
    p.add_argument("--speed", action="store_true", help="also time batched vs looped client distillation")
    p.add_argument("--speed-iterations", type=int, default=5, help="[%(default)s]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feddgm"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-existing", action="store_true", help="reuse finished runs (their record.json)")
    a = p.parse_args(argv)
    a.variants = {}
    for text in a.variant:
        name, _, spec = text.partition("=")
        method, _, kv = spec.partition(":")
        if not name or not method:
            p.error(f"--variant expects NAME=METHOD[:KEY=VALUE;...], got {text!r}")
        a.variants[name.strip()] = (method.strip(), parse_kv([t for t in kv.split(";") if t.strip()]))
    for m in a.methods:
        base = parse_method(a.variants.get(m, (m, {}))[0])[0]
        if base not in BASE_METHODS:
            p.error(f"unknown method {m!r}; the methods are {', '.join(BASE_METHODS)} (FedDGM-family ones with "
                    "optional -soft and @SPACE)")
    if a.premise_seeds < 1:
        p.error(f"--premise-seeds must be at least 1, got {a.premise_seeds}")
    a.seed = a.seeds[0]  # the speed comparison's seed
    return a


def parse_method(name: str) -> tuple[str, bool, str | None]:
    """``feddgm-soft@F0`` -> ("feddgm", True, "F0")."""
    base, _, space = name.partition("@")
    soft = base.endswith("-soft")
    if soft:
        base = base[: -len("-soft")]
    return base, soft, space or None


def feddgm_options(a) -> dict:
    return parse_kv(a.option)


def parse_kv(items) -> dict:
    """``["k=v", ...]`` -> ``{k: json(v) or the string}``."""
    opts = {}
    for text in items:
        k, _, v = text.partition("=")
        try:
            opts[k.strip()] = json.loads(v)
        except ValueError:
            opts[k.strip()] = v
    return opts


def last_mean(curve, k: int = 3) -> float:
    """Mean accuracy of the last ``k`` evaluated rounds (less noisy than the final round alone)."""
    acc = [a for _, a in curve if a is not None][-k:]
    return sum(acc) / max(1, len(acc))


def slug(text: str) -> str:
    return text.replace("+", "p").replace("@", "_at_").replace("/", "_")


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


def run_method(method: str, data, a, settings: tuple[dict, dict | None], seed: int, run_dir: Path) -> dict:
    """One run of ``method`` in a cell with its ``settings`` (:func:`method_settings`); returns its record (final,
    last3, curve, premise, cross_arch, wall_s)."""
    from fedlatent.apps.premise import premise_check
    from fedlatent.fl.base import FLConfig
    from fedlatent.fl.centralised import centralised
    from fedlatent.fl.run import read_metrics
    from fedlatent.fl.simulation import simulate

    spec, variant = a.variants.get(method, (method, {}))
    base = parse_method(spec)[0]
    cfg, opts = settings
    t0 = time.perf_counter()
    rec: dict = {"method": method, "spec": [spec, variant], "settings": {"config": cfg, "method_options": opts},
                 "premise": None, "cross_arch": None}
    if base == "centralised":
        res = centralised(data, FLConfig(**cfg))
        rec.update(final=res.final_accuracy, best=res.best_accuracy, curve=res.curve)
    else:
        kw = dict(dataset=data.name, data=data, out=run_dir, overwrite=True, progress=False)
        if base in ("feddgm", "feddgm+avg"):
            per_round = []
            hook = round_premise(per_round, data, a, seed) if a.premise_every_round and a.premise_epochs else None
            sim = simulate(base, method_options=opts, on_round=hook, **kw, **cfg)
            if per_round:
                rec["premise_rounds"] = per_round
                plot_premise_rounds(per_round, run_dir / "premise_rounds.png", f"{data.name} {method}, seed {seed}")
        elif base == "dynafed":
            synth = max(3, a.rounds // 2)
            if synth >= a.rounds:
                raise FedLatentError(f"dynafed needs rounds > {synth}")
            sim = simulate("dynafed", method_options={"synth_round": synth, "iterations": a.dynafed_iterations,
                                                      "ipc": a.dynafed_ipc, "progress": False}, **kw, **cfg)
        else:
            sim = simulate("fedavg", **kw, **(cfg | ({"momentum": 0.9} if base == "fedavg-m" else {})))
        rows = read_metrics(run_dir / "metrics.csv")
        rec.update(final=sim.final_accuracy, best=sim.best_accuracy,
                   curve=[(int(r["round"]), r["accuracy"]) for r in rows if r.get("accuracy") is not None])
        st = sim.strategy
        if base in ("feddgm", "feddgm+avg") and getattr(st, "pool", None) is not None:
            rec["space"] = st.space
            if a.premise_epochs:
                rec["premise"] = premise_check(st, data, arch=a.model, epochs=a.premise_epochs,
                                               seeds=premise_seeds(seed, a.premise_seeds)).as_dict()
            if a.eval_archs and (run_dir / "distilled.safetensors").is_file():
                rec["cross_arch"] = cross_arch(run_dir / "distilled.safetensors", data, a, seed)
    rec["last3"] = last_mean(rec["curve"])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def round_premise(rows: list, data, a, seed: int):
    """An ``on_round`` hook appending each round's premise check (the round's pool against its initial latents,
    paired per training seed; no real subset) to ``rows``."""
    from fedlatent.apps.premise import premise_check

    def hook(rnd: int, strategy, engine_state) -> None:
        if getattr(strategy, "pool", None) is None:
            return
        p = premise_check(strategy, data, arch=a.model, epochs=a.premise_epochs,
                          seeds=premise_seeds(seed, a.premise_seeds), real=False)
        hist = engine_state.get("history") or [{}]
        rows.append({"round": int(rnd), "accuracy": hist[-1].get("accuracy"), "distilled": p.distilled,
                     "initial": p.initial, "f_move": p.f_move, "gaps": [d - i for d, i in zip(p.distilled["accs"],
                                                                                             p.initial["accs"])]})
    return hook


def plot_premise_rounds(rows: list, path: Path, title: str) -> None:
    """Each round's pool and initial latents (fresh-network accuracy, mean ± std over the training seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("distilled", "(a) the round's distilled pool"), ("initial", "(b) its initial latents")):
        ax.errorbar(r, [100 * row[key]["mean"] for row in rows], yerr=[100 * row[key]["std"] for row in rows],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("fresh network test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def premise_seeds(seed: int, n: int) -> tuple[int, ...]:
    """The premise check's training seeds: the run's own first (so one seed is the earlier records' check), then
    ``seed + 1000 k``, clear of the other runs' seeds."""
    return (seed,) + tuple(seed + 1000 * k for k in range(1, n))


def method_settings(method: str, a, common: dict, alpha: float, seed: int, gen, space, dataset: str):
    """(FLConfig fields, FedDGM-family options or None) of one run: the preset (``--preset auto``: cifar10-cpu on
    CIFAR-10, cpu otherwise), then ``-O``, then the variant; what ``--skip-existing`` compares with a finished run."""
    from fedlatent.apps.distill import PRESETS
    from fedlatent.fl.base import FLConfig

    spec, extra = a.variants.get(method, (method, {}))
    base, soft, m_space = parse_method(spec)
    fl_fields = set(FLConfig.__dataclass_fields__)
    cfg = {**common, "alpha": alpha, "seed": seed, **{k: v for k, v in extra.items() if k in fl_fields}}
    extra = {k: v for k, v in extra.items() if k not in fl_fields}
    if base not in ("feddgm", "feddgm+avg"):
        return cfg, None
    preset = a.preset if a.preset != "auto" else ("cifar10-cpu" if dataset == "cifar10" else "cpu")
    opts = dataclasses.asdict(PRESETS[preset].method)
    if base == "feddgm+avg":  # the hybrid's own fine-tune length (DynaFed's), not FedDGM's server epochs
        opts.pop("train_epochs")
    opts |= feddgm_options(a) | extra
    opts.update(generator=opts.get("generator") or gen, surrogate=a.model, progress=False, soft_labels=soft)
    opts["space"] = m_space or opts.get("space") or space
    if str(opts["space"]).lower() == "pixel":
        opts["generator"] = None
    return cfg, opts


def same_settings(recorded: dict | None, current: dict) -> bool:
    """Whether a finished run's recorded settings are the command's. A FedDGM option the record lacks counts as
    the same when the command gives it its default: an option added after the run, left at the value the run
    had before the option existed, does not make ``--skip-existing`` rerun it."""
    from fedlatent.fl.methods.feddgm import FedDGMConfig

    if recorded is None:
        return False
    current = json.loads(json.dumps(current))
    old, new = recorded.get("method_options"), current.get("method_options")
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = {f.name: f.default for f in dataclasses.fields(FedDGMConfig)}
        new = {k: v for k, v in new.items() if k in old or k not in defaults or v != defaults[k]}
        current = {**current, "method_options": new}
    return recorded == current


def generator_sha(method_options: dict | None) -> str | None:
    """sha256 of the generator file a FedDGM-family run distils through (None: not FedDGM, pixel space, or a
    random prior); ``--skip-existing`` reruns a run recorded with another file, since a manifest name such as
    ``cifar10`` may point at a retrained checkpoint."""
    from fedlatent.generators.resolve import generator_identity

    g = (method_options or {}).get("generator")
    if not g or str(g).startswith("random"):
        return None
    return generator_identity(str(g))[1]


def rerun_reason(rec: dict, settings: tuple[dict, dict | None], g_sha: str | None) -> str | None:
    """Why a finished run's record cannot stand for the command's run (None: reuse it): other settings
    (:func:`same_settings`) or, for a FedDGM-family run, another generator file (:func:`generator_sha`)."""
    if not same_settings(rec.get("settings"), dict(zip(("config", "method_options"), settings))):
        return "other settings"
    if g_sha is not None and rec.get("generator_sha256") != g_sha:
        return "another generator file (or one not recorded)"
    return None


_REAL_CROSS: dict = {}  # (data, arch, images per class, seed, epochs) -> the real subset's accuracy, shared by a cell


def cross_arch(path: Path, data, a, seed: int) -> dict:
    """Fresh ``--eval-archs`` networks on the distilled set vs on a random real subset of equal size (computed once
    per cell and architecture: every method of a cell has the same subset)."""
    from fedlatent.distill.pixels import evaluate_synthetic
    from fedlatent.evaluate import evaluate_distilled, real_subset
    from fedlatent.export import load_distilled

    cross = evaluate_distilled(path, a.eval_archs, data=data, epochs=a.eval_epochs, seeds=(seed,), progress=False)
    ds, _ = load_distilled(path)
    ipc = max(1, len(ds) // data.num_classes)
    xr, yr = real_subset(data, ipc, seed)
    out = {}
    for arch in a.eval_archs:
        key = (id(data), arch, ipc, seed, a.eval_epochs)
        if key not in _REAL_CROSS:
            _REAL_CROSS[key] = evaluate_synthetic(xr, yr, arch, data, epochs=a.eval_epochs, seeds=(seed,),
                                                  progress=False)["mean"]
        out[arch] = {"distilled": cross[arch]["mean"], "real": _REAL_CROSS[key], "images": len(ds)}
    return out


def main(argv=None) -> int:
    from fedlatent.apps.distill import private_training_data
    from fedlatent.generators.resolve import default_generator

    a = parse_args(argv)
    out = Path(a.out)
    if not a.skip_existing:
        RunFolder.check(out, a.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    opts = feddgm_options(a)
    results = {"args": vars(a), "runs": [], "speed": [], "python": platform.python_version(), "torch": torch.__version__}
    common = dict(clients=a.clients, participation=1.0, rounds=a.rounds, local_epochs=a.local_epochs, lr=a.lr,
                  momentum=a.momentum, weight_decay=0.0, batch_size=a.batch_size, model=a.model, partition="dirichlet",
                  device=a.device)
    for name in a.datasets:
        data = load_dataset(name, root=a.data_root, resize=a.image_size)
        gen = opts.get("generator") or default_generator(data.name)
        space = opts.get("space") or (None if gen else "pixel")
        # Every method trains on the same data: the training set without the generator's public split.
        data, excluded = private_training_data(data, None if space == "pixel" else gen)
        for seed in a.seeds:
            cdata = subsample(data, a.train_subsample, a.test_subsample, seed)
            for alpha in a.alphas:
                for method in a.methods:
                    run_dir = out / f"{name}-a{alpha}-s{seed}-{slug(method)}"
                    done = run_dir / "record.json"
                    rec = json.loads(done.read_text()) if a.skip_existing and done.is_file() else None
                    settings = method_settings(method, a, common, alpha, seed, gen, space, name)
                    g_sha = generator_sha(settings[1])
                    why = None if rec is None else rerun_reason(rec, settings, g_sha)
                    if why:
                        print(f"{run_dir.name}: finished with {why}; rerunning", flush=True)
                        rec = None
                    if rec is not None:
                        print(f"{name} alpha={alpha} seed={seed} {method}: final {rec['final']:.4f} (existing run)",
                              flush=True)
                    else:
                        run_dir.mkdir(parents=True, exist_ok=True)
                        rec = run_method(method, cdata, a, settings, seed, run_dir)
                        rec.update(dataset=name, alpha=alpha, seed=seed, generator=gen, train=int(len(cdata.y_train)),
                                   public_split_excluded=excluded, generator_sha256=g_sha)
                        write_json(done, rec)
                        prem = rec.get("premise")
                        extra = "" if not prem else (f"; premise distilled {prem['distilled']['mean']:.4f} vs initial "
                                                     f"{prem['initial']['mean']:.4f} vs real "
                                                     f"{prem['real']['mean']:.4f}")
                        print(f"{name} alpha={alpha} seed={seed} {method}: final {rec['final']:.4f} "
                              f"({rec['wall_s']:.0f} s){extra}", flush=True)
                    results["runs"].append(rec)
                    write_json(out / "results.json", results)
        if a.speed:
            results["speed"].append({"dataset": name, **speed(subsample(data, a.train_subsample, a.test_subsample,
                                                                        a.seed), a,
                                                              {**opts, "generator": gen, "space": space})})
            write_json(out / "results.json", results)
    print_tables(results)
    if results["runs"]:
        plot_cells(results["runs"], out / "curves.png")
        print(f"\naccuracy curves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
