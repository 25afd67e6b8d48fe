"""``fedlatent pretrain``: train the built-in style generator on a public split of a dataset."""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import click

from fedlatent.cli._options import data_options, progress_option

#: options that do not change the trained weights (left out of the recorded command)
_OPERATIONAL = ("no_progress", "resume", "state", "eval_every", "eval_per_class", "eval_gan_train_epochs", "curve",
                "manifest_path", "no_manifest")


def _command_line(ctx: click.Context, params: dict | None = None) -> str:
    """The full command that reproduces this run: every option spelled out with its value (defaults included)."""
    parts = ["fedlatent", ctx.info_name or "pretrain"]
    values = params if params is not None else ctx.params
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in _OPERATIONAL:
            continue
        v = values.get(p.name)
        if p.is_flag and p.secondary_opts:
            parts.append(p.opts[0] if v else p.secondary_opts[0])
        elif p.is_flag:
            if v:
                parts.append(p.opts[0])
        elif v is not None:
            parts += [p.opts[0], str(v)]
    return shlex.join(parts)


@click.command("pretrain")
@data_options()
@click.option("--public-split", "public_split", default="0.1", show_default=True,
              help="Public part of the train set: a fraction (0.1) or a count (6000), optionally ':seed=N'. "
                   "The federated clients never see these images.")
@click.option("--steps", type=int, default=2000, show_default=True, help="GAN training steps (D + G update each).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr-g", type=float, default=2e-3, show_default=True)
@click.option("--lr-d", type=float, default=2e-3, show_default=True)
@click.option("--ac-weight", type=float, default=1.0, show_default=True,
              help="Weight of the auxiliary-classifier loss on generated images.")
@click.option("--augment", default="translation,cutout", show_default=True,
              help="DiffAugment policy: comma list of color, translation, cutout ('' = none).")
@click.option("--d-channels", type=int, default=32, show_default=True,
              help="Discriminator width at full resolution (doubles at every 2x downsampling, up to --d-channels-max).")
@click.option("--d-channels-max", type=int, default=128, show_default=True)
@click.option("--mbstd-group", type=int, default=4, show_default=True,
              help="Minibatch standard deviation group size in the discriminator (0 = off); against mode collapse.")
@click.option("--r1-gamma", type=float, default=0.0, show_default=True,
              help="R1 gradient penalty on real images (0 = off), applied lazily every --r1-every steps.")
@click.option("--r1-every", type=int, default=16, show_default=True)
@click.option("--ms-weight", type=float, default=0.0, show_default=True,
              help="Mode-seeking regularisation (Mao et al. 2019): same-class samples from distant z must differ "
                   "(0 = off); against collapse within a class.")
@click.option("--balanced/--no-balanced", default=True, show_default=True,
              help="Draw real images class-balanced (matters for imbalanced data sets).")
@click.option("--channel-base", type=int, default=512, show_default=True)
@click.option("--channel-max", type=int, default=64, show_default=True)
@click.option("--z-dim", type=int, default=64, show_default=True)
@click.option("--w-dim", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop (and save) after this many minutes.")
@click.option("--save-every", type=int, default=500, show_default=True,
              help="Export the generator and write the training checkpoint every N steps.")
@click.option("--state", default=None, type=click.Path(dir_okay=False),
              help="Training checkpoint (weights, optimiser moments, RNG states; default: OUT with .train.safetensors).")
@click.option("--resume", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Continue exactly from a training checkpoint (*.train.safetensors); only --steps, --max-minutes "
                   "and --save-every may change.")
@click.option("--eval-every", type=float, default=None,
              help="Measure quality (fidelity, coverage, FD, GAN-train...) every N minutes of training.")
@click.option("--eval-per-class", type=int, default=100, show_default=True)
@click.option("--eval-gan-train-epochs", type=int, default=60, show_default=True,
              help="GAN-train epochs in periodic evaluation (0 = no GAN-train).")
@click.option("--curve", default=None, type=click.Path(dir_okay=False),
              help="Quality-vs-training-time log, one JSON per line (default: OUT with .curve.jsonl).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--name", default=None, help="Manifest entry name (default: the output file's stem).")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Manifest to add the entry to (default: MANIFEST.json next to --out).")
@click.option("--no-manifest", is_flag=True, help="Do not write a manifest entry.")
@progress_option
def pretrain(**opts):
    """Train fedlatent's built-in class-conditional style generator on a PUBLIC split (GAN, CPU-friendly).

    Writes a safetensors checkpoint (config + training record in its metadata), a resumable training checkpoint
    (--state) and a manifest entry with the exact command, sha256 and the public split (fraction, seed) the
    federated code must exclude. Works on any data set, e.g. ``--dataset npz:/path/to/folder`` with 100 classes.
    """
    from fedlatent.utils import FedLatentError

    ctx = click.get_current_context()
    if opts["resume"]:
        from click.core import ParameterSource

        from fedlatent.generators.train import read_train_state

        saved, _ = read_train_state(opts["resume"])
        allowed = {"steps", "max_minutes", "save_every", "out", "name", "device", "resume"} | set(_OPERATIONAL)
        given = sorted(k for k in opts if k not in allowed and ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE)
        orig = saved["info"].get("options")
        if orig is None:
            raise FedLatentError(f"{opts['resume']}: training checkpoint does not record its options")
        changed = [k for k in given if orig.get(k) != opts[k]]
        if changed:
            raise FedLatentError(f"--resume continues the recorded run; these options differ from it: "
                                 f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
        opts = {**opts, **{k: v for k, v in orig.items() if k not in allowed}}
        for k in ("steps", "max_minutes", "save_every"):  # these may change, but only when given
            if k in orig and ctx.get_parameter_source(k) != ParameterSource.COMMANDLINE:
                opts[k] = orig[k]
    _run(ctx, **opts)


def _run(ctx, dataset, data_root, image_size, public_split, steps, batch_size, lr_g, lr_d, ac_weight, augment,
         d_channels, d_channels_max, mbstd_group, r1_gamma, r1_every, ms_weight, balanced, channel_base, channel_max,
         z_dim, w_dim, seed, max_minutes, save_every, state, resume, eval_every, eval_per_class, eval_gan_train_epochs,
         curve, device, out, name, manifest_path, no_manifest, no_progress):
    from fedlatent.data import load_dataset
    from fedlatent.generators.builtin import BuiltinConfig
    from fedlatent.generators.registry import MANIFEST_NAME, write_manifest_entry
    from fedlatent.generators.train import (
        TrainConfig,
        manifest_entry,
        parse_public_split,
        public_split_indices,
        state_path_for,
        train_generator,
    )
    from fedlatent.utils import FedLatentError

    params = dict(ctx.params)
    params.update(dataset=dataset, data_root=data_root, image_size=image_size, public_split=public_split,
                  batch_size=batch_size, lr_g=lr_g, lr_d=lr_d, ac_weight=ac_weight, augment=augment,
                  d_channels=d_channels, d_channels_max=d_channels_max, mbstd_group=mbstd_group, r1_gamma=r1_gamma,
                  r1_every=r1_every, ms_weight=ms_weight, balanced=balanced, channel_base=channel_base,
                  channel_max=channel_max, z_dim=z_dim, w_dim=w_dim, seed=seed, steps=steps, max_minutes=max_minutes,
                  save_every=save_every)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FedLatentError(f"--out must end in .safetensors, got {out}")
    if image_size is None and dataset == "digits":
        image_size = 16
    data = load_dataset(dataset, root=data_root, resize=image_size)
    fraction, split_seed = parse_public_split(public_split, len(data.y_train))
    idx = public_split_indices(len(data.y_train), fraction, split_seed)
    public = {"fraction": fraction, "seed": split_seed, "n_public": int(len(idx)), "n_train": int(len(data.y_train)),
              "rule": "first round(fraction*n) of numpy_rng(seed, 'public-split').permutation(n) "
                      "(fedlatent.generators.train.public_split_indices)"}
    gen_cfg = BuiltinConfig(img_resolution=data.image_size, img_channels=data.channels, c_dim=data.num_classes,
                            z_dim=z_dim, w_dim=w_dim, channel_base=channel_base, channel_max=channel_max,
                            dataset=data.name, classes=list(data.classes))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr_g=lr_g, lr_d=lr_d, ac_weight=ac_weight, augment=augment,
                      d_channels=d_channels, d_channels_max=d_channels_max, mbstd_group=mbstd_group,
                      r1_gamma=r1_gamma, r1_every=r1_every, ms_weight=ms_weight, balanced=balanced, seed=seed,
                      max_minutes=max_minutes, save_every=save_every)
    command = _command_line(ctx, params)
    options = {k: params[k] for k in params if k not in _OPERATIONAL and k not in ("out", "name", "device")}
    info = {"dataset": data.name, "dataset_spec": dataset, "image_size": data.image_size, "public_split": public,
            "command": command, "options": options, "mean": list(data.mean), "std": list(data.std)}
    state = Path(state) if state else state_path_for(out)
    evaluate, curve_path = None, None
    if eval_every:
        from fedlatent.generators.builtin import as_generator
        from fedlatent.generators.quality import QualityConfig, QualityEvaluator

        qcfg = QualityConfig(per_class=eval_per_class, gan_train=eval_gan_train_epochs > 0,
                             gan_train_per_class=eval_per_class, gan_train_epochs=max(1, eval_gan_train_epochs))
        click.echo("pretrain: preparing the quality evaluator (classifier on real data, real baselines)", err=True)
        ev = QualityEvaluator(data, qcfg, progress=not no_progress)
        ceiling = {k: round(v, 4) for k, v in ev.ceiling.items() if not k.startswith("per_class")}
        click.echo(f"pretrain: real-vs-real ceiling {ceiling}", err=True)

        def evaluate(G):
            r = ev(as_generator(G))
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                    if not k.startswith("per_class")}

        curve_path = Path(curve) if curve else out.with_name(out.name[: -len(".safetensors")] + ".curve.jsonl")
        if not curve_path.exists():
            curve_path.parent.mkdir(parents=True, exist_ok=True)
            curve_path.write_text(json.dumps({"ceiling": ceiling, "eval_config": asdict(qcfg)}) + "\n")
    click.echo(f"pretrain: {data.name} {data.channels}x{data.image_size}px, {data.num_classes} classes, {len(idx)} "
               f"public images (fraction {fraction:g}, seed {split_seed}), {steps} steps x batch {batch_size}"
               + (f", resuming {resume}" if resume else ""), err=True)
    import signal
    import threading

    def _stop(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None  # `kill PID` saves like Ctrl-C
    try:
        res = train_generator(data, idx, gen_cfg, cfg, out=out, info=info, progress=not no_progress, device=device,
                              state_path=state, resume=resume, evaluate=evaluate, eval_every_minutes=eval_every,
                              curve_path=curve_path)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {res.generator.num_parameters()} parameters, "
               f"{res.steps_done} steps in {res.seconds:.0f} s); training checkpoint {state}")
    if not no_manifest:
        mpath = Path(manifest_path) if manifest_path else out.parent / MANIFEST_NAME
        entry = manifest_entry(out, mpath.parent, res.generator, data.name, public, command, res.steps_done,
                               res.seconds)
        if res.curve:
            entry["quality"] = {k: v for k, v in res.curve[-1].items() if k not in ("eval_seconds",)}
        write_manifest_entry(name or out.stem, entry, mpath)
        click.echo(f"manifest entry {name or out.stem!r} -> {mpath}")
    from fedlatent.summary import echo_summary

    echo_summary([], title="pretrain summary", wall_s=res.seconds, out_dir=out.parent,
                 files=[out] + ([] if no_manifest else [mpath]),
                 info={"steps": res.steps_done, "parameters": res.generator.num_parameters()})


COMMANDS = [pretrain]
