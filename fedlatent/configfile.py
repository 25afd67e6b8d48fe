"""Replayable configs: ``--config FILE`` (TOML or JSON) for the commands that train.

A config file holds the command's options by their long names (``rounds = 10``, ``local-epochs = 2`` or
``local_epochs = 2``); a repeatable ``KEY=VALUE`` option (``--option`` / ``--method-option``) takes a table::

    # simulate.toml
    method = "fedprox"
    rounds = 10
    alpha = 0.1
    [method-option]
    mu = 0.01

A run folder's ``config.json`` (written by ``fedlatent simulate`` / ``fedlatent distill``) is a config file too:
``--config RUN/config.json`` replays that run with the same options, hence the same metrics.

Precedence: an option given on the command line (or through its environment variable) wins over the file, the
file wins over the preset and the built-in defaults. For the ``KEY=VALUE`` options the file's entries come first
and the command line's after them, so a key given on the command line wins. Unknown keys are one error that lists
the valid ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import click
from click.core import ParameterSource

from .utils import FedLatentError

USER_SOURCES = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
SKIP_PARAMS = ("config_file", "help", "version")


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (anything else) file as a dict; FedLatentError for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise FedLatentError(f"{p}: no such config file")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise FedLatentError(f"{p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise FedLatentError(f"{p}: a config file holds a table/object of options, got {type(data).__name__}")
    return data


def _key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def option_index(command: click.Command) -> dict[str, click.Parameter]:
    """Every name a config file may use for the command's options: long flag names (``_`` or ``-``) and dests."""
    out: dict[str, click.Parameter] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in SKIP_PARAMS:
            continue
        out[_key(p.name)] = p
        for o in p.opts:  # not the secondary (--no-x) names of a boolean flag
            if o.startswith("--"):
                out[_key(o)] = p
    return out


def _key_values(value: Any, where: str) -> list[str]:
    if isinstance(value, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]  # values read back as JSON, strings included
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FedLatentError(f"{where}: expects a table of KEY = VALUE (or a list of 'KEY=VALUE' strings)")


def resolve(ctx: click.Context, values: Mapping[str, Any], params: dict[str, Any], source: str) -> dict[str, Any]:
    """``params`` (the command's keyword arguments) with the file's ``values`` filled in where the user set nothing.

    ``values`` maps option names (see :func:`option_index`) to plain values; they are converted and checked by
    the option's own click type, so a bad value is the same error as on the command line.
    """
    index = option_index(ctx.command)
    unknown = sorted(k for k in values if _key(k) not in index)
    if unknown:
        valid = sorted({o.lstrip("-") for p in set(index.values()) for o in p.opts if o.startswith("--")})
        raise FedLatentError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    out = dict(params)
    for k, v in values.items():
        p = index[_key(k)]
        where = f"{source}: {k}"
        user_set = ctx.get_parameter_source(p.name) in USER_SOURCES
        if p.multiple:
            file_items = _key_values(v, where)
            out[p.name] = tuple(file_items) + tuple(params.get(p.name) or ())  # command line after: it wins
            continue
        if user_set:
            continue
        try:
            out[p.name] = None if v is None else p.type_cast_value(ctx, v)
        except click.BadParameter as e:
            raise FedLatentError(f"{where}: {e.message}") from None
    return out


# --- a run folder's config.json -> option values ------------------------------------------------------------

def _takes(params: Mapping[str, click.Parameter], name: str, value: Any) -> bool:
    """Whether the command's option ``name`` exists and takes ``value`` (e.g. ``--batched/--looped`` does not take
    FedDGM's ``batched = "auto"``: that goes through ``-O``)."""
    p = params.get(name)
    if p is None or p.multiple:
        return False
    try:
        p.type.convert(value, p, None) if value is not None else None
    except click.BadParameter:
        return False
    return True


def _fl_items(cfg: Mapping[str, Any], params: Mapping[str, click.Parameter], out: dict[str, Any],
              extra: dict[str, Any]) -> None:
    """FLConfig values: an option of the command when it has one that takes the value, else ``-O fl.KEY``."""
    for k, v in cfg.items():
        if _takes(params, k, v):
            out[k] = v
        else:
            extra[f"fl.{k}"] = v


def simulate_options(cfg: Mapping[str, Any], params: Mapping[str, click.Parameter]) -> dict | None:
    """``fedlatent simulate``'s config.json -> its options (None when ``cfg`` is not one); ``params``: the
    command's options by name (its FLConfig options come from FLConfig, so every field is one)."""
    if "method" not in cfg or "config" not in cfg or "versions" not in cfg or "distill" in cfg:
        return None
    out: dict[str, Any] = {"method": cfg["method"], "dataset": cfg.get("dataset_name") or cfg["dataset"]["name"],
                           "image_size": cfg.get("image_size_requested"), "data_root": cfg.get("data_root")}
    extra: dict[str, Any] = {}
    _fl_items(cfg["config"], params, out, extra)
    for k, v in (cfg.get("method_options") or {}).items():  # the method's options, exactly as recorded
        extra[f"method.{k}"] = v
    if extra:
        out["option"] = extra
    return out


def distill_options(cfg: Mapping[str, Any], params: Mapping[str, click.Parameter]) -> dict | None:
    """``fedlatent distill``'s config.json -> its options (None when ``cfg`` is not one); ``params``: the
    command's options by name (a method option goes to its own option when the command has one, else ``-O``)."""
    from .fl.base import FLConfig

    rec = cfg.get("distill")
    if not isinstance(rec, Mapping) or "versions" not in cfg:
        return None
    out: dict[str, Any] = {k: rec[k] for k in ("preset", "dataset", "data_root", "image_size", "checkpoint_every",
                                                "baseline") if rec.get(k) is not None}
    extra: dict[str, Any] = {}
    _fl_items(rec["config"], params, out, extra)
    for k, v in rec["method_options"].items():
        if v is None or k == "dataset":  # None: the built-in choice; dataset: recorded from the data
            continue
        if k not in FLConfig.__dataclass_fields__ and _takes(params, k, v):
            out[k] = v
        else:
            extra[f"method.{k}"] = v
    if extra:
        out["option"] = extra
    return out


__all__ = ["load_file", "option_index", "resolve", "simulate_options", "distill_options"]
