"""``fedlatent datasets``: which registry datasets are available here, and how to get the others."""
from __future__ import annotations

import click

from fedlatent.data import DATASETS, inspect_dataset, search_roots


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


@click.command("datasets")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder searched first (before $FEDLATENT_DATA and the torchvision cache).")
def datasets(data_root: str | None) -> None:
    """List every registry dataset: where it was found, image shape, classes, train/test sizes."""
    rows = [inspect_dataset(name, data_root) for name in DATASETS]
    header = ("dataset", "status", "image", "classes", "train", "test")
    table = []
    for r in rows:
        status = r["source"] if r["found"] else "not found"
        if r["error"]:
            status += " (unreadable)"
        c, h, w = r["shape"]
        table.append((r["name"], status, f"{c}x{h}x{w}", _fmt(r["num_classes"]), _fmt(r["train"]), _fmt(r["test"])))
    widths = [max(len(str(t[i])) for t in [header, *table]) for i in range(len(header))]
    right = {3, 4, 5}

    def line(cells) -> str:
        return "  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(cells, widths))).rstrip()

    click.echo(line(header))
    for r, cells in zip(rows, table):
        click.echo(line(cells))
        if r["found"]:
            click.echo(f"    at {r['location']}")
        if r["error"]:
            click.echo(f"    problem: {r['error']}")
        if r["hint"]:
            click.echo(f"    to get it: {r['hint']}")
    click.echo("searched (in order): " + ", ".join(str(p) for p in search_roots(data_root)))
    click.echo("any folder with train.npz/test.npz loads as --dataset npz:/path/to/folder")


COMMANDS = [datasets]
