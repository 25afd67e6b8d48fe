"""``fedlatent methods [NAME]``: the federated methods and their options (type, default, documentation)."""
from __future__ import annotations

import textwrap

import click


@click.command("methods")
@click.argument("name", required=False)
def methods(name):
    """List the federated methods, or NAME's options with their types, defaults and documentation.

    The options are the fields of the method's config dataclass; pass them as -O KEY=VALUE to `fedlatent
    simulate --method NAME` (and, for feddgm, to `fedlatent distill`, which starts from a preset).
    """
    from fedlatent.fl.base import available_methods, get_method
    from fedlatent.fl.options import describe

    if name is None:
        for m in available_methods():
            cls = get_method(m)
            doc = (cls.__doc__ or "").strip().splitlines()
            click.echo(f"{m:10s} {doc[0] if doc else ''}")
        click.echo("\n`fedlatent methods NAME` lists a method's options.")
        return
    cls = get_method(name)
    rows = describe(cls)
    click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    if not rows:
        click.echo("  (no options)")
    for r in rows:
        click.echo(f"\n  {r['name']} : {r['type']} = {r['default']!r}")
        if r["doc"]:
            click.echo(textwrap.fill(r["doc"], width=100, initial_indent="      ", subsequent_indent="      "))
    if name == "feddgm":
        from fedlatent.apps.distill import PRESETS

        click.echo("\n`fedlatent distill --preset P` starts from these instead of the defaults above:")
        for p, preset in PRESETS.items():
            diff = preset.differences()
            items = [f"{k}={v!r}" for part in ("config", "method") for k, v in diff[part].items()]
            click.echo(textwrap.fill(f"{p}: " + ", ".join(items), width=100, initial_indent="  ",
                                     subsequent_indent="      "))


COMMANDS = [methods]
