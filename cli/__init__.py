"""The ``fedlatent`` command line (click).

Every module in this package that defines a ``COMMANDS`` list of click commands is picked up
automatically, so each command lives in its own file and stays a thin layer over the Python API.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from fedlatent import __version__


class _Group(click.Group):
    """Prints a FedLatentError as one line and exits with status 2 instead of a traceback."""

    def invoke(self, ctx):
        from fedlatent.utils import FedLatentError

        try:
            return super().invoke(ctx)
        except FedLatentError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedlatent")
def main() -> None:
    """fedlatent: federated learning on non-IID data through server-side dataset distillation."""


for _mod in pkgutil.iter_modules(__path__):
    _m = importlib.import_module(f"{__name__}.{_mod.name}")
    for _cmd in getattr(_m, "COMMANDS", []):
        main.add_command(_cmd)
