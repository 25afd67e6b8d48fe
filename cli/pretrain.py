"""``fedlatent pretrain``: train the built-in style generator on a public split of a dataset."""
from __future__ import annotations

import shlex
from pathlib import Path

import click


def _command_line(ctx: click.Context) -> str:
    """The full command that reproduces this run: every option spelled out with its value (defaults included)."""
    parts = ["fedlatent", ctx.info_name or "pretrain"]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in ("quiet",):
            continue
        v = ctx.params.get(p.name)
        if p.is_flag:
            if v:
                parts.append(p.opts[0])
        elif v is not None:
            parts += [p.opts[0], str(v)]
    return shlex.join(parts)


@click.command("pretrain")
@click.option("--dataset", default="digits", show_default=True, help="Dataset name (or npz:/folder).")
@click.option("--data-root", default=None, help="Folder holding the dataset files (else $FEDLATENT_DATA).")
@click.option("--image-size", type=int, default=None,
              help="Resize images to this many pixels (digits: 16 by default, like `fedlatent simulate`).")
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
              help="Discriminator width at full resolution (doubles at every 2x downsampling, max 128).")
@click.option("--channel-base", type=int, default=512, show_default=True)
@click.option("--channel-max", type=int, default=64, show_default=True)
@click.option("--z-dim", type=int, default=64, show_default=True)
@click.option("--w-dim", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop (and save) after this many minutes.")
@click.option("--save-every", type=int, default=500, show_default=True, help="Save a checkpoint every N steps.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--name", default=None, help="Manifest entry name (default: the output file's stem).")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Manifest to add the entry to (default: MANIFEST.json next to --out).")
@click.option("--no-manifest", is_flag=True, help="Do not write a manifest entry.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pretrain(dataset, data_root, image_size, public_split, steps, batch_size, lr_g, lr_d, ac_weight, augment,
             d_channels, channel_base, channel_max, z_dim, w_dim, seed, max_minutes, save_every, device, out, name,
             manifest_path, no_manifest, quiet):
    """Train fedlatent's built-in class-conditional style generator on a PUBLIC split (GAN, CPU-friendly).

    Writes a safetensors checkpoint (config + training record in its metadata) and a manifest entry with the
    exact command, sha256 and the public split (fraction, seed) the federated code must exclude.
    """
    from fedlatent.data import load_dataset
    from fedlatent.generators.builtin import BuiltinConfig
    from fedlatent.generators.registry import MANIFEST_NAME, write_manifest_entry
    from fedlatent.generators.train import (
        TrainConfig, manifest_entry, parse_public_split, public_split_indices, train_generator,
    )
    from fedlatent.utils import FedLatentError

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
                            dataset=dataset, classes=list(data.classes))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr_g=lr_g, lr_d=lr_d, ac_weight=ac_weight, augment=augment,
                      d_channels=d_channels, seed=seed, max_minutes=max_minutes, save_every=save_every)
    command = _command_line(click.get_current_context())
    info = {"dataset": dataset, "image_size": data.image_size, "public_split": public, "command": command,
            "mean": list(data.mean), "std": list(data.std)}
    click.echo(f"pretrain: {dataset} {data.channels}x{data.image_size}px, {len(idx)} public images "
               f"(fraction {fraction:g}, seed {split_seed}), {steps} steps x batch {batch_size}", err=True)
    res = train_generator(data, idx, gen_cfg, cfg, out=out, info=info, progress=not quiet, device=device)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {res.generator.num_parameters()} parameters, "
               f"{res.steps_done} steps in {res.seconds:.0f} s)")
    if not no_manifest:
        mpath = Path(manifest_path) if manifest_path else out.parent / MANIFEST_NAME
        entry = manifest_entry(out, mpath.parent, res.generator, dataset, public, command, res.steps_done,
                               res.seconds)
        write_manifest_entry(name or out.stem, entry, mpath)
        click.echo(f"manifest entry {name or out.stem!r} -> {mpath}")
    from fedlatent.summary import echo_summary

    echo_summary([], title="pretrain summary", wall_s=res.seconds, out_dir=out.parent,
                 files=[out] + ([] if no_manifest else [mpath]),
                 info={"steps": res.steps_done, "parameters": res.generator.num_parameters()})


COMMANDS = [pretrain]
