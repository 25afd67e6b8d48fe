"""``fedlatent ops``: which backend the custom ops use here, and building the CUDA extension ahead of time."""
from __future__ import annotations

import json

import click

from fedlatent.utils import FedLatentError


@click.command("ops")
@click.option("--build", is_flag=True, help="Compile (or load from the cache) the C++/CUDA extension now.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def ops(build: bool, as_json: bool) -> None:
    """Status of fedlatent's fused ops (FEDLATENT_OPS=ref|cuda|auto): backend, build cache, last build error."""
    from fedlatent import ops as _ops

    _ops.mode()  # an invalid FEDLATENT_OPS is an error here, not a status line
    st = _ops.status(build=build)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        for k, v in st.items():
            click.echo(f"{k:>14}: {'-' if v is None else v}")
    if build and not st.get("loaded"):
        raise FedLatentError(f"the ops extension did not build: {st.get('error') or 'unknown error'} "
                             "(the pure-PyTorch reference is used instead)")


COMMANDS = [ops]
