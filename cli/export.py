"""``fedlatent export``: write a run's distilled set to a file (optionally as uint8)."""
from __future__ import annotations

from pathlib import Path

import click

from fedlatent.utils import FedLatentError


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="The .safetensors file to write.")
@click.option("--uint8", is_flag=True, help="Store the images as uint8 0..255 (4x smaller, quantised).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def export(run_dir, out, uint8, force):
    """Export the distilled set of RUN_DIR (a `fedlatent distill` run folder, or a distilled.safetensors file).

    The result is a validated distilled.safetensors (images, labels, provenance, latents, metadata); read it back
    with `fedlatent.load_distilled(path)` or train other architectures on it with `fedlatent eval`.
    """
    from fedlatent.export import load_distilled, save_distilled

    src = Path(run_dir)
    if src.is_dir():
        src = src / "distilled.safetensors"
        if not src.is_file():
            raise FedLatentError(f"{run_dir}: no distilled.safetensors (has the run finished a round?)")
    dst = Path(out)
    if dst.exists() and not force:
        raise FedLatentError(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise FedLatentError("--out is the source file itself")
    ds, meta = load_distilled(src)
    save_distilled(dst, ds.images, ds.labels, dataset=meta["dataset"], class_names=meta["class_names"],
                   mean=meta["mean"], std=meta["std"], generator=meta.get("generator") or None,
                   generator_sha256=meta.get("generator_sha256") or None, latent_space=meta.get("latent_space", "pixel"),
                   ipc=meta.get("ipc"), seed=meta.get("seed"), clients=ds.clients, rounds=ds.rounds,
                   latents=ds.latents, extra=meta.get("extra"), uint8=uint8)
    click.echo(f"exported {len(ds)} images ({len(meta['class_names'])} classes, "
               f"{'uint8' if uint8 else 'float'}) -> {dst}")


COMMANDS = [export]
