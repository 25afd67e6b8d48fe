"""``fedlatent pretrained list|fetch|eval``: the pretrained generators of pretrained/MANIFEST.json."""
from __future__ import annotations

import click

from fedlatent.cli._options import progress_option


@click.group("pretrained")
def pretrained() -> None:
    """List and download pretrained generators (built-in checkpoints and official StyleGAN-XL pickles)."""


@pretrained.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def list_cmd(as_json):
    """Show every manifest entry and whether its file is available locally."""
    import json

    from fedlatent.generators.registry import entry_path, read_manifest

    m = read_manifest()
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    rows = [("name", "kind", "dataset", "res", "classes", "layers", "local", "size")]
    for name, e in sorted(m["models"].items()):
        p = entry_path(name, e)
        size = e.get("size_bytes")
        rows.append((name, e.get("kind", "?"), str(e.get("dataset", "")), str(e.get("resolution", "")),
                     str(e.get("classes", "")), str(e.get("num_layers") or "?"), "yes" if p.is_file() else "no",
                     f"{size / 1e6:.1f}MB" if size else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@pretrained.command("fetch")
@click.argument("name")
@click.option("--dest", default=None, type=click.Path(file_okay=False), help="Download folder (default: cache).")
@progress_option
def fetch_cmd(name, dest, no_progress):
    """Download NAME (with a progress bar) and verify its sha256 when the manifest knows it."""
    from fedlatent.generators.registry import fetch

    p = fetch(name, dest=dest, progress=not no_progress)
    click.echo(str(p))


@pretrained.command("eval")
@click.argument("names", nargs=-1, required=True)
@click.option("--dataset", default=None, help="Data set to compare with (default: the generator's own).")
@click.option("--data-root", default=None, help="Folder holding the dataset files (else $FEDLATENT_DATA).")
@click.option("--per-class", type=int, default=100, show_default=True,
              help="Generated images per class (and real test images in each real set) for fidelity/PRDC/FD.")
@click.option("--nearest-k", type=int, default=5, show_default=True, help="k of precision/recall/density/coverage.")
@click.option("--classifier", default="convnet:width=64", show_default=True,
              help="Feature classifier trained on real training images (cached).")
@click.option("--classifier-steps", type=int, default=1500, show_default=True)
@click.option("--gan-train-per-class", type=int, default=100, show_default=True,
              help="N of GAN-train: a fresh network trained on N generated images per class vs N real ones.")
@click.option("--gan-train-arch", default="convnet", show_default=True)
@click.option("--gan-train-epochs", type=int, default=300, show_default=True, help="0 = skip GAN-train.")
@click.option("--gan-train-seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--psi", type=float, default=1.0, show_default=True, help="Truncation psi of the samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--grid", default=None, type=click.Path(dir_okay=False),
              help="PNG with 10 samples per class (one row per class) of the first generator.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON.")
@progress_option
def eval_cmd(names, dataset, data_root, per_class, nearest_k, classifier, classifier_steps, gan_train_per_class,
             gan_train_arch, gan_train_epochs, gan_train_seeds, psi, seed, grid, json_out, no_progress):
    """Offline quality of generators NAMES (manifest names or checkpoint paths), each metric next to its
    real-vs-real ceiling: class fidelity, precision/recall/density/coverage, Frechet distance (all in a real-data
    classifier's feature space) and GAN-train accuracy."""
    import json

    from fedlatent.data import load_dataset
    from fedlatent.generators import load_generator
    from fedlatent.generators.quality import QualityConfig, QualityEvaluator, format_quality, save_grid
    from fedlatent.generators.registry import read_manifest
    from fedlatent.utils import FedLatentError, atomic_write_text

    gens = [(n, load_generator(n)) for n in names]
    if dataset is None:
        entry = read_manifest()["models"].get(names[0]) or {}
        dataset = entry.get("dataset")
        if not dataset and str(names[0]).endswith(".safetensors"):
            from fedlatent.generators.builtin import read_builtin_metadata

            info = read_builtin_metadata(names[0])["info"]
            dataset = info.get("dataset_spec") or info.get("dataset")
        if not dataset:
            raise FedLatentError(f"generator {names[0]!r} does not name its data set; pass --dataset")
    G0 = gens[0][1]
    data = load_dataset(dataset, root=data_root, resize=G0.img_resolution)
    seeds = tuple(int(s) for s in gan_train_seeds.split(",") if s.strip())
    cfg = QualityConfig(per_class=per_class, nearest_k=nearest_k, classifier=classifier,
                        classifier_steps=classifier_steps, gan_train=gan_train_epochs > 0,
                        gan_train_per_class=gan_train_per_class, gan_train_arch=gan_train_arch,
                        gan_train_epochs=max(1, gan_train_epochs), gan_train_seeds=seeds or (0,),
                        truncation_psi=psi, seed=seed)
    ev = QualityEvaluator(data, cfg, progress=not no_progress)
    rows = [(n, ev(G)) for n, G in gens]
    click.echo(f"{data.name}: {per_class} images/class, feature classifier {classifier} (real test accuracy "
               f"{ev.classifier_test_acc:.3f}); GAN-train: {gan_train_arch} on {gan_train_per_class}/class, "
               f"{gan_train_epochs} epochs, real test set")
    click.echo(format_quality(rows, ev.ceiling))
    if grid:
        save_grid(G0, grid, data.num_classes, seed=seed, psi=psi)
        click.echo(f"wrote {grid}")
    if json_out:
        from dataclasses import asdict

        report = {"dataset": data.name, "config": asdict(cfg), "real": ev.ceiling,
                  "generators": {n: r for n, r in rows}}
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}")


COMMANDS = [pretrained]
