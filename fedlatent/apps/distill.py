"""The run driver behind ``fedlatent distill``: presets, :func:`distill_federated` (generator public split,
run folder with report.md, checkpoints, resume)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..artifacts import DISTILLED_FILE, REPORT_FILE
from ..artifacts.report import write_report
from ..errors import FedLatentError
from ..fl.base import FLConfig
from ..fl.methods.feddgm import FedDGM, FedDGMConfig
from ..fl.options import split_options
from ..generators.registry import no_generator_message
from ..generators.resolve import default_generator, generator_identity

logger = logging.getLogger("fedlatent.apps.distill")
PREMISE_FILE = "premise.json"

@dataclass(frozen=True)
class Preset:
    """A documented configuration of ``fedlatent distill``: the FL settings and the FedDGM options."""

    config: FLConfig
    method: FedDGMConfig

    def differences(self) -> dict[str, dict[str, Any]]:
        """Where this preset differs from the defaults of :class:`FLConfig` and :class:`FedDGMConfig`."""
        out: dict[str, dict[str, Any]] = {}
        for part, default in (("config", FLConfig()), ("method", FedDGMConfig())):
            mine = dataclasses.asdict(getattr(self, part))
            out[part] = {k: v for k, v in mine.items() if v != getattr(default, k)}
        return out


#: Documented configurations.
#:
#: "cpu": digits 16 px through the built-in ``digits`` generator (space F2), 5 clients (Dirichlet 0.5, all
#: participate), 3 rounds of 5 local epochs, ConvNet-D3 width 16 as surrogate and global model, ipc 2, 20 MTT
#: iterations of 8 syn_steps per client, 100 server epochs. Measured: about 45 s of CPU time (single thread) for
#: the whole run, final accuracy ~0.91; wall time on a shared, loaded 2-core machine was 130-190 s.
#: Deviations from the reference, tuned on digits: lr_img is 10, not 1000. The built-in generator's f_k are
#: smaller-scale than StyleGAN-XL's: 1000 saturates the images within a few rounds (0.62 final accuracy), and the
#: premise check (seeds 0-2; benchmarks/RESULTS.md) puts 10 ahead of 30 and 100: the distilled pool trains a fresh
#: network to 89.2 / 85.9 / 78.0 % against 83.6 % for the generator's samples at the initial latents (final
#: accuracy 91.0 / 91.6 / 89.6 %); at 100 the latents move by 72 % of their norm and lose the prior. DSA without
#: flip (digits are not mirror-symmetric); server SGD with momentum 0.9 and weight decay 5e-4 for its 100 epochs
#: (the reference's plain SGD needs its 1000 epochs).
#: "paper": the reference recipe, field by field (FedDG23/FedDG-main; its CIFAR-10 README command
#: ``--ipc=10 --nworkers 10 --round 20 --Iteration 100 --Iteration_g 20 --beta 0.5 --batch_train 256``, the rest
#: argparse defaults):
#:
#: ===================  ====================================  =============================================
#: field                value                                 reference source
#: ===================  ====================================  =============================================
#: clients              10, all participate                   README ``--nworkers 10``; shared_args ``--frac`` 1
#: partition, alpha     Dirichlet, 0.5                        README ``--beta 0.5``
#: rounds               20                                    README ``--round 20``
#: local_epochs         20                                    README ``--Iteration_g 20`` (clients.py train_net)
#: client SGD           lr 0.01, momentum 0, wd 0, batch 256  fed_main.py ``SGD(lr=args.lr_net)``, ``--lr_net``
#: model = surrogate    ConvNet-D5 width 128, instance norm   shared_args ``--depth 5 --width 128``; utils.py
#: ipc                  10                                    README ``--ipc=10``
#: iterations           100                                   README ``--Iteration 100``
#: syn_steps            20                                    fed_main.py ``--syn_steps`` 20
#: lr_img, lr_w         1000, 1                               fed_main.py ``--lr_img``, ``--lr_w``
#: lr_lr, lr_teacher    1e-5, 0.01                            fed_main.py ``--lr_lr``, ``--lr_teacher``
#: latent momentum      0.5                                   glad_utils.py / server_update.py SGD
#: DSA                  color_crop_cutout_flip_scale_rotate   shared_args ``--dsa_strategy``
#: server training      1000 epochs, SGD lr 0.01, momentum 0,  fed_main.py ``--inner_loop`` 1000,
#:                      wd 0, batch 256, DSA                  ``SGD(net.parameters(), lr=args.lr_net)``
#: pool                 this round's sets only                fed_main.py rebuilds ``image_syn_trains`` a round
#: ===================  ====================================  =============================================
#:
#: It needs a GPU (one CIFAR-10 round is hours on a CPU). Where it still deviates: the exact meta-gradient (the
#: reference uses TESLA's approximation), and the latent space is the generator's default (``F5`` for
#: StyleGAN-XL as the reference's ``--layer=5``; the built-in generators have fewer layers).
#: "cifar10-cpu": the cell of ``benchmarks/feddgm.py`` on CIFAR-10, re-tuned there (benchmarks/RESULTS.md, the
#: sweep at alpha 0.01): 10 clients (Dirichlet 0.01), 10 rounds of 2 local epochs (plain SGD lr 0.01, batch 64),
#: ConvNet-D3 width 32, ipc 2, 20 iterations of 8 syn_steps, the full DSA (flip included: CIFAR-10 is mirror-
#: symmetric), 100 server epochs. lr_img 30: with the mode-seeking ``cifar10`` generator, 100 moved the f_k by 42-78 %
#: of their norm and the pool trained fresh networks 1.8 points worse than its own initial latents (2 seeds);
#: 30 moves them 13-21 % and the pool beats its initialisation, at the same final accuracy (RESULTS.md, 2026-12-02).
#: On the committed generator (run 4) 30 again beats 10, 100 and 50 iterations on the pool-vs-initial premise
#: (RESULTS.md, "The pool against its initial latents").
#: Engines 'fast' for the MTT, the generator's rendering, the server training and the clients' local training
#: (bf16 convolutions + torch.compile where the CPU has them, else the plain engines; RESULTS.md, "The cell's
#: engine" and "The rest of the cell through the fast engines").
#: Each is a pair of config instances; :meth:`Preset.differences` lists where it differs from the defaults
#: (``fedlatent methods feddgm`` prints that).
PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        FLConfig(clients=5, participation=1.0, rounds=3, local_epochs=5, lr=0.01, momentum=0.0, weight_decay=0.0,
                 batch_size=32, partition="dirichlet", alpha=0.5, model="convnet:width=16"),
        FedDGMConfig(ipc=2, iterations=20, syn_steps=8, lr_img=10.0, lr_w=1.0, lr_lr=1e-5, lr_teacher=0.01,
                     surrogate="convnet:width=16", train_epochs=100, train_batch=256, train_momentum=0.9,
                     train_weight_decay=5e-4, dsa_strategy="color_crop_cutout_scale_rotate")),
    "cifar10-cpu": Preset(
        FLConfig(clients=10, participation=1.0, rounds=10, local_epochs=2, lr=0.01, momentum=0.0, weight_decay=0.0,
                 batch_size=64, partition="dirichlet", alpha=0.01, model="convnet-d3:width=32"),
        FedDGMConfig(ipc=2, iterations=20, syn_steps=8, lr_img=30.0, lr_w=1.0, lr_lr=1e-5, lr_teacher=0.01,
                     surrogate="convnet-d3:width=32", train_epochs=100, train_batch=256, train_momentum=0.9,
                     train_weight_decay=5e-4, dsa_strategy="color_crop_cutout_flip_scale_rotate", mtt_engine="fast",
                     render_engine="fast", train_engine="fast", client_engine="fast")),
    "paper": Preset(
        FLConfig(clients=10, participation=1.0, rounds=20, local_epochs=20, lr=0.01, momentum=0.0, weight_decay=0.0,
                 batch_size=256, partition="dirichlet", alpha=0.5, model="convnet-d5:width=128"),
        FedDGMConfig(ipc=10, iterations=100, syn_steps=20, lr_img=1000.0, lr_w=1.0, lr_lr=1e-5, lr_teacher=0.01,
                     momentum=0.5, surrogate="convnet-d5:width=128", train_epochs=1000, train_lr=0.01,
                     train_momentum=0.0, train_weight_decay=0.0, train_batch=256, train_dsa=True,
                     dsa_strategy="color_crop_cutout_flip_scale_rotate", pool="round", soft_labels=False)),
}


@dataclass
class DistillResult:
    """Outcome of :func:`distill_federated`."""

    simulation: Any
    out_dir: Path | None
    distilled: Path | None
    report: Path | None
    resumed_from: int | None = None
    baseline: Any = None  # the baseline's SimulationResult (None: --baseline none)
    comparison: Any = None  # fedlatent.compare.Comparison of the run against its baseline
    premise: Any = None  # fedlatent.apps.premise.Premise (None: premise_epochs=0)

    def comparison_info(self) -> dict[str, str]:
        """The baseline rows of the end-of-run summary (empty without a baseline)."""
        c = self.comparison
        if c is None:
            return {}
        r = c.rounds_to_baseline_final

        def rounds(k):
            return "never" if r[k] is None else str(r[k])

        return {f"{c.baseline} final {c.key}": f"{c.baseline_final:.4f}",
                f"gain over {c.baseline}": f"{100 * c.gain:+.2f} points",
                f"rounds to {c.baseline}'s final": f"{c.method} {rounds(c.method)}, {c.baseline} {rounds(c.baseline)}"}

    def premise_info(self) -> dict[str, str]:
        """The premise-check rows of the end-of-run summary (empty when it was skipped)."""
        p = self.premise
        if p is None:
            return {}
        real = "-" if p.real is None else f"{p.real['mean']:.4f}"
        return {"premise (distilled / initial latents / real subset)":
                f"{p.distilled['mean']:.4f} / {p.initial['mean']:.4f} / {real} "
                f"({'holds' if p.holds else 'fails'})"}

    @property
    def final_accuracy(self) -> float:
        return self.simulation.final_accuracy

    def line(self) -> str:
        sim = self.simulation
        res = f", resumed after round {self.resumed_from}" if self.resumed_from is not None else ""
        where = f" -> {self.out_dir}" if self.out_dir else ""
        vs = (f"; {self.comparison.baseline} {self.comparison.baseline_final:.4f} (gain "
              f"{100 * self.comparison.gain:+.2f} points)") if self.comparison is not None else ""
        return (f"feddgm: final accuracy {sim.final_accuracy:.4f} (best {sim.best_accuracy:.4f} at round "
                f"{sim.best_round}), {sim.rounds} rounds, {sim.wall_s:.1f} s{res}{vs}{where}")


def _split_options(options: Mapping[str, Any]) -> tuple[dict, dict]:
    """FLConfig fields and FedDGM options of ``distill_federated``'s keywords (None = not given, except where
    None is a value: generator, space, batch_syn, max_batch)."""
    given = {k: v for k, v in options.items() if v is not None or k in ("generator", "space", "batch_syn", "max_batch")}
    return split_options(FedDGM, given, what="distill option")


def private_training_data(data, generator: str | None):
    """Drop the generator's public split from the training set (the generator never saw client data).

    Applies when the generator's manifest entry records a ``public_split`` for this dataset and size; returns
    ``(data, info)`` with ``info`` describing what was excluded (None when nothing was).
    """
    from ..data import ImageData
    from ..data.hf import PARTITIONS_KEY
    from ..generators.train import private_split_indices

    if generator is None:
        return data, None
    _, _, entry = generator_identity(generator)
    ps = (entry or {}).get("public_split")
    if not ps or entry.get("dataset") != data.name:
        return data, None
    n = int(data.y_train.shape[0])
    if int(ps.get("n_train", -1)) != n:
        logger.warning("generator %s was trained on a public split of %s training images; this training set has %d, "
                    "so the split cannot be excluded", generator, ps.get("n_train"), n)
        return data, {"excluded": 0, "reason": "size mismatch"}
    keep_np = private_split_indices(n, float(ps["fraction"]), int(ps["seed"]))
    keep = torch.from_numpy(keep_np)
    extra = dict(data.extra)
    if extra.get(PARTITIONS_KEY) is not None:  # given partitions index the full set: renumber them, drop the public
        import numpy as np

        new_index = np.full(n, -1, dtype=np.int64)
        new_index[np.asarray(keep_np, dtype=np.int64)] = np.arange(len(keep_np))
        extra[PARTITIONS_KEY] = [new_index[np.asarray(p, dtype=np.int64)][new_index[np.asarray(p, dtype=np.int64)] >= 0]
                                 for p in extra[PARTITIONS_KEY]]
    out = ImageData(data.name, data.x_train.index_select(0, keep).contiguous(), data.y_train.index_select(0, keep),
                    data.x_test, data.y_test, list(data.classes), data.mean, data.std, data.source, extra)
    return out, {"excluded": n - len(keep), "fraction": ps["fraction"], "seed": ps["seed"], "kept": len(keep)}


def distill_federated(dataset: str = "digits", data_root: str | os.PathLike | None = None, preset: str = "cpu",
                      out: str | os.PathLike | None = None, overwrite: bool = False, resume: str | os.PathLike | None = None,
                      image_size: int | None = None, progress: bool = True, checkpoint_every: int = 1,
                      data=None, exclude_public: bool = True, backend: Any = "serial", ray_address: str | None = None,
                      log: str | Sequence[str] | None = None, baseline: str = "fedavg", premise_epochs: int = 300,
                      **options: Any):
    """Run FedDGM end to end and write a run folder; the API behind ``fedlatent distill``.

    ``preset`` ("cpu" | "paper", see :data:`PRESETS`) gives the defaults; ``options`` override them with any
    :class:`~fedlatent.fl.base.FLConfig` field (clients, rounds, alpha, model, seed, device, ...) or
    :class:`FedDGM` option (generator, space, ipc, iterations, surrogate, batched, ...). The generator's public
    split is removed from the training set (:func:`private_training_data`; ``exclude_public=False`` when the
    caller passes ``data`` it has already restricted). ``resume=RUN_DIR`` continues a
    killed run from its last checkpoint with the options recorded in its config.json (then ``out`` and the
    options must be left out). ``backend`` / ``ray_address``: where the clients and the looped per-client
    distillation run ("serial", "ray" or a :class:`fedlatent.backends.ray.RayBackend`, as in
    :func:`fedlatent.fl.simulation.simulate`; results are the same). ``log``: trackers besides metrics.csv
    (:mod:`fedlatent.tracking`, e.g. ``"tensorboard,mlflow"``). ``baseline``: "fedavg" (default) also runs FedAvg
    through the same engine on the same data, FLConfig (seed: partition, client schedule, initial weights of
    ``model``) into ``RUN/baseline/`` and compares the two (accuracy.png, report.md, the result's ``comparison``);
    "none" skips it. A resumed run reruns the baseline (deterministic: same numbers) unless its folder is complete.
    ``premise_epochs``: after the rounds, the premise check (:mod:`fedlatent.apps.premise`: the distilled pool vs
    the generator's samples at the initial latents vs a random real subset, each training a fresh global-model
    network for this many epochs) goes into report.md and ``premise.json``; 0 skips it.
    Returns a :class:`DistillResult`.
    """
    if baseline not in BASELINES:
        raise FedLatentError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    from ..backends import make_backend

    runner = make_backend(backend, ray_address)
    try:
        return _distill_federated(dataset, data_root, preset, out, overwrite, resume, image_size, progress,
                                  checkpoint_every, data, exclude_public, runner, options, log, baseline,
                                  premise_epochs)
    finally:
        if runner is not None and runner is not backend:
            runner.close()


def _distill_federated(dataset, data_root, preset, out, overwrite, resume, image_size, progress, checkpoint_every,
                       data, exclude_public, runner, options, log=None, baseline="fedavg", premise_epochs=300):
    """The body of :func:`distill_federated` (``runner``: None or a started-on-demand RayBackend)."""
    from ..data import load_dataset
    from ..fl.checkpoint import has_checkpoint, load_checkpoint, make_checkpoint_fn, resume_state
    from ..fl.run import RunFolder, read_metrics
    from ..fl.simulation import run_simulation

    resumed_from = None
    resume_arg = None
    cpu0 = time.process_time()
    if resume is not None:
        run_dir = Path(resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.is_file():
            raise FedLatentError(f"{run_dir}: not a run folder (config.json missing); nothing to resume")
        try:
            saved = json.loads(cfg_path.read_text())["distill"]
        except (ValueError, KeyError) as e:
            raise FedLatentError(f"{cfg_path}: not written by `fedlatent distill` ({type(e).__name__})") from None
        if options or out is not None:
            raise FedLatentError("--resume takes the options of the original run; give no other options")
        dataset, data_root, preset = saved["dataset"], saved["data_root"], saved["preset"]
        image_size, checkpoint_every = saved["image_size"], saved["checkpoint_every"]
        baseline = saved.get("baseline", "none")  # runs of earlier versions had none
        premise_epochs = int(saved.get("premise_epochs", 0))
        cfg_opts, meth_opts = dict(saved["config"]), dict(saved["method_options"])
        out, overwrite = run_dir, True
        if has_checkpoint(run_dir):
            ckpt = load_checkpoint(run_dir)
            resumed_from = ckpt["round"]
            resume_arg = resume_state(ckpt)
    else:
        if preset not in PRESETS:
            raise FedLatentError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        o_cfg, o_meth = _split_options(options)
        cfg_opts = {**dataclasses.asdict(PRESETS[preset].config), **o_cfg}
        meth_opts = {**dataclasses.asdict(PRESETS[preset].method), **o_meth}
        if out is None:
            out = Path("runs") / f"feddgm-{dataset.replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    meth_opts["progress"] = progress
    cfg = FLConfig(**cfg_opts).check()
    if out is not None and resume is None:
        RunFolder.check(out, overwrite)
    if data is None:
        if image_size is None and dataset == "digits":
            image_size = 16
        data = load_dataset(dataset, root=data_root, resize=image_size)
    elif resume is None:  # the caller's data: record its name, not the ``dataset`` argument's default
        dataset, data_root = data.name, None
    space = meth_opts.get("space")
    generator = meth_opts.get("generator")
    if generator is None and str(space).lower() != "pixel":
        generator = default_generator(data.name)
        if generator is None:
            raise FedLatentError(no_generator_message(dataset if dataset.startswith("npz:") else data.name, data_root))
        meth_opts["generator"] = generator
    excluded = None
    if exclude_public:
        data, excluded = private_training_data(data, None if str(space).lower() == "pixel" else generator)
    import hashlib

    data_check = {"n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                  "labels_sha256": hashlib.sha256(data.y_train.cpu().numpy().tobytes()).hexdigest()}
    if resume is not None and saved.get("data_check") not in (None, data_check):
        raise FedLatentError(f"{resume}: the training data differ from the original run's ({saved['data_check']} vs "
                             f"{data_check}); cannot resume")
    if meth_opts.get("dataset") is None:
        meth_opts["dataset"] = data.name
    strategy = FedDGM(**meth_opts)
    if out is not None and resume is None and overwrite:  # stale artefacts of an older run in this folder
        _clean_artifacts(Path(out))
    record = {"dataset": dataset, "data_root": None if data_root is None else str(data_root), "preset": preset,
              "image_size": image_size, "checkpoint_every": checkpoint_every, "config": cfg.to_dict(),
              "method_options": {k: v for k, v in meth_opts.items() if k != "progress"}, "data_check": data_check,
              "baseline": baseline, "premise_epochs": int(premise_epochs)}
    run_info = {"distill": record, "generator_public_split": excluded}
    if runner is not None:
        run_info["backend"] = runner.describe()
        runner.attach(strategy)
    ckpt_fn = make_checkpoint_fn(out, every=checkpoint_every) if out is not None else None
    from contextlib import nullcontext

    from ..tracking import open_trackers

    with open_trackers(out, log, resume_from=resumed_from) if out is not None else nullcontext() as tracker:
        sim = run_simulation(strategy, data, cfg, out_dir=out, overwrite=overwrite, run_info=run_info,
                             progress=progress, checkpoint_fn=ckpt_fn, resume=resume_arg,
                             client_map=runner.client_map if runner is not None else None, tracker=tracker)
        base = comparison = None
        if baseline != "none":
            base, comparison = run_baseline(baseline, data, cfg, out, sim, progress, runner, resumed_from is not None,
                                            tracker)
        premise = None
        if premise_epochs and strategy.pool is not None:
            from .premise import premise_check

            premise = premise_check(strategy, data, epochs=int(premise_epochs), progress=progress)
            logger.info("premise check: distilled %.4f, initial latents %.4f, real subset %s", premise.distilled["mean"],
                      premise.initial["mean"], "-" if premise.real is None else f"{premise.real['mean']:.4f}")
        report = distilled = None
        if out is not None:
            from ..compare import comparison_markdown

            out = Path(out)
            distilled = out / DISTILLED_FILE if (out / DISTILLED_FILE).is_file() else None
            report = write_report(out, read_metrics(out / "metrics.csv"), record, sim, strategy, excluded,
                                  cpu_s=time.process_time() - cpu0,
                                  comparison=comparison_markdown(comparison) if comparison is not None else None,
                                  premise=premise.markdown() if premise is not None else None)
            if premise is not None:
                from ..fl.run import write_json

                write_json(out / PREMISE_FILE, premise.as_dict())
            if tracker:
                tracker.log_run_folder(out)
    return DistillResult(sim, Path(out) if out is not None else None, distilled, report, resumed_from, base,
                         comparison, premise)


#: Baselines ``distill_federated`` can run beside FedDGM (``none``: no baseline).
BASELINES = ("fedavg", "none")
BASELINE_DIR = "baseline"


def run_baseline(name: str, data, cfg: FLConfig, out, sim, progress: bool, runner, resumed: bool, tracker=None):
    """Run the baseline method through the same engine on ``data`` with ``cfg`` (same seed: same partition,
    client schedule and initial weights of ``cfg.model``, FedDGM's global model) into ``out/baseline``; returns
    ``(SimulationResult or a stand-in read from a complete folder, Comparison)``. Draws ``out/accuracy.png`` with
    both curves. On a resumed run a complete baseline folder (summary.json written) is read, not rerun."""
    from ..compare import compare, plot_comparison
    from ..fl.base import get_method
    from ..fl.run import read_metrics
    from ..fl.simulation import run_simulation

    folder = Path(out) / BASELINE_DIR if out is not None else None
    if resumed and folder is not None and (folder / "summary.json").is_file():
        rows = read_metrics(folder / "metrics.csv")
        base = None
    else:
        strategy = get_method(name)()
        if runner is not None:
            runner.attach(strategy)
        base = run_simulation(strategy, data, cfg, out_dir=folder, overwrite=True, progress=progress,
                              run_info={"baseline_of": "feddgm"},
                              client_map=runner.client_map if runner is not None else None)
        rows = base.history
    comparison = compare(sim.history, rows, method="feddgm", baseline=name)
    if tracker:
        for r in rows:
            tracker.log_metrics({f"{name}_{k}": r.get(k) for k in ("accuracy", "loss")}, step=int(r["round"]))
    if out is not None:
        plot_comparison({"feddgm": sim.history, name: rows}, Path(out) / "accuracy.png", baseline=name,
                        title=f"feddgm vs {name}: test accuracy")
    return base, comparison


def _clean_artifacts(folder: Path) -> None:
    import shutil

    for p in folder.glob("grid_round*.png"):
        p.unlink(missing_ok=True)
    for name in (DISTILLED_FILE, REPORT_FILE, PREMISE_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


__all__ = ["Preset", "PRESETS", "DistillResult", "distill_federated", "private_training_data", "run_baseline",
           "BASELINES"]
