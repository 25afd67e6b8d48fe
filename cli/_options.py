"""Command-line options shared by several commands, declared once, and the one ``KEY=VALUE`` parser."""
from __future__ import annotations

import json
from typing import Callable

import click

from fedlatent.backends import BACKENDS, RayBackend, make_backend
from fedlatent.errors import FedLatentError


def parse_key_value(text: str, option: str = "--option") -> tuple[str, object]:
    """``KEY=VALUE`` of a repeatable option (-O): the key with dashes as underscores, the value parsed as JSON
    when it is JSON (numbers, true/false, null, lists) and kept as a string otherwise."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise FedLatentError(f"{option} {text!r} is not KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def backend_options(command: Callable) -> Callable:
    """The ``--backend`` / ``--ray-*`` options of a click command (keyword arguments backend, ray_address,
    ray_cpus_per_client, ray_gpus_per_client, ray_retries, ray_timeout; see :func:`fedlatent.backends.make_backend`)."""
    opts = [
        click.option("--backend", type=click.Choice(list(BACKENDS)), default="serial", show_default=True,
                     help="Where clients run: serial (this process, one after the other) or ray (parallel Ray tasks; "
                          "needs pip install 'fedlatent[ray]'). Same seed, same results (with as many PyTorch "
                          "threads here as --ray-cpus-per-client)."),
        click.option("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
                     help="Join this Ray cluster instead of starting a local Ray instance."),
        click.option("--ray-cpus-per-client", type=click.FloatRange(0, min_open=True), default=None,
                     help="CPUs each client task declares (and PyTorch threads it uses). [default: 1]"),
        click.option("--ray-gpus-per-client", type=click.FloatRange(0), default=None,
                     help="GPUs each client task declares, e.g. 0.25 for four clients per GPU. [default: 0]"),
        click.option("--ray-retries", type=click.IntRange(0), default=None,
                     help="Retries of a failed client task (exception or worker crash; not a rejected input or "
                          "setting, which would fail again); a client that still fails is left out of its round "
                          "and recorded. [default: 1]"),
        click.option("--ray-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
                     help="Wall-clock limit of a round's client tasks (and, separately, of FedDGM's per-client "
                          "distillation tasks), counted from submission, time waiting for a free CPU/GPU included; a "
                          "task still running then is cancelled (its worker killed) and its client recorded as "
                          "failed. [default: no limit]"),
    ]
    for o in reversed(opts):
        command = o(command)
    return command


def backend_from_cli(backend: str, ray_address: str | None, ray_cpus_per_client: float | None,
                     ray_gpus_per_client: float | None, ray_retries: int | None,
                     ray_timeout: float | None = None) -> "RayBackend | None":
    """The backend the :func:`backend_options` values describe (None for serial)."""
    return make_backend(backend, ray_address, cpus_per_client=ray_cpus_per_client,
                        gpus_per_client=ray_gpus_per_client, retries=ray_retries, timeout=ray_timeout)


__all__ = ["parse_key_value", "backend_options", "backend_from_cli"]
