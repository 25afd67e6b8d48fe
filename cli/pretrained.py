"""``fedlatent pretrained list|fetch``: the pretrained generators of pretrained/MANIFEST.json."""
from __future__ import annotations

import click


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
@click.option("--quiet", is_flag=True)
def fetch_cmd(name, dest, quiet):
    """Download NAME (with a progress bar) and verify its sha256 when the manifest knows it."""
    from fedlatent.generators.registry import fetch

    p = fetch(name, dest=dest, progress=not quiet)
    click.echo(str(p))


COMMANDS = [pretrained]
