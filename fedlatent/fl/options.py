"""Method options: one typed config dataclass per method, and the one parser that reads options into it.

A method declares ``config_class`` (a dataclass whose fields are its options, each documented by the string
literal that follows the field and validated in ``__post_init__``). From that class come: the method's
constructor (:func:`make_config`), its ``options()`` (:meth:`fedlatent.fl.base.Strategy.options`), the split of
a mixed option dict into FLConfig fields and method options (:func:`split_options`: ``fedlatent distill``,
the Flower run config), the coercion of command-line strings (:func:`coerce`) and ``fedlatent methods``
(:func:`describe`).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from typing import Any, Mapping

from ..errors import FedLatentError


def config_class(method: Any) -> type | None:
    """The config dataclass of a Strategy class or instance (None when it has none)."""
    cls = method if isinstance(method, type) else type(method)
    c = getattr(cls, "config_class", None)
    return c if c is not None and dataclasses.is_dataclass(c) else None


def option_names(method: Any) -> set[str]:
    """The option names a method takes: its config fields (or, without a config, its constructor's keywords)."""
    c = config_class(method)
    if c is not None:
        return {f.name for f in dataclasses.fields(c)}
    cls = method if isinstance(method, type) else type(method)
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def make_config(cls: type, config: Any = None, options: Mapping[str, Any] | None = None) -> Any:
    """``cls(**{**config's fields, **options})``: a config instance (e.g. a preset) with some options changed.

    An unknown option is a TypeError (as for a constructor; the engines report it as "bad options for method").
    """
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__} (or keyword options), got {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options or {}) - set(names))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    base = {} if config is None else {n: getattr(config, n) for n in names}
    return cls(**{**base, **dict(options or {})})


def split_options(method: Any, options: Mapping[str, Any], what: str = "option", where: str = "",
                  lenient: bool = False) -> tuple[dict, dict]:
    """``(FLConfig fields, method options)`` of a mixed option dict, the one rule of every command and API:
    a key is an FLConfig field if it names one, else a method option; ``fl.KEY`` / ``method.KEY`` say which
    (FedDGM's ``momentum`` is both: ``method.momentum`` is the latent optimiser's). An unknown key is a one-line
    FedLatentError, or - ``lenient`` - left to the method (whose constructor rejects it)."""
    from .base import FLConfig

    fl_fields = set(FLConfig.__dataclass_fields__)
    meth_fields = option_names(method)
    cfg, meth = {}, {}
    for k, v in options.items():
        if k.startswith("fl.") and k[3:] in fl_fields:
            cfg[k[3:]] = v
        elif k.startswith("method."):
            meth[k[len("method."):]] = v
        elif k in fl_fields:
            cfg[k] = v
        elif k in meth_fields or lenient:
            meth[k] = v
        else:
            raise FedLatentError(f"unknown {what} {k!r}{where}; valid: "
                                 f"{', '.join(sorted(fl_fields | meth_fields))}")
    return cfg, meth


def _base_types(tp: Any) -> tuple[type, ...]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())) or args:
        return tuple(a for a in args if isinstance(a, type))
    return (tp,) if isinstance(tp, type) else ()


def coerce(cls: type, name: str, value: Any) -> Any:
    """A command-line value for the field ``name`` of ``cls`` in the field's type: a string is read as that type
    (``"3"`` for an int, ``"true"`` for a bool, ``"none"`` / ``"null"`` for an optional field); a value that
    already has a declared type is kept."""
    hints = typing.get_type_hints(cls)
    if name not in hints or not isinstance(value, str):
        return value
    types = _base_types(hints[name])
    if str in types:
        return value
    low = value.strip().lower()
    if low in ("none", "null") and type(None) in types:
        return None
    if bool in types and low in ("true", "false", "1", "0", "yes", "no"):
        return low in ("true", "1", "yes")
    for t in (int, float):
        if t in types:
            try:
                return t(value)
            except ValueError:
                continue
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field: the string literal that follows its declaration in the class body."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                out[a.target.id] = " ".join(b.value.value.split())
    return out


def describe(method: Any) -> list[dict[str, Any]]:
    """Per option: name, type, default and doc (what ``fedlatent methods NAME`` prints)."""
    c = config_class(method)
    rows = []
    if c is not None:
        docs, hints = field_docs(c), typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default,
                         "doc": docs.get(f.name, "")})
        return rows
    cls = method if isinstance(method, type) else type(method)
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        rows.append({"name": p.name, "type": _type_name(p.annotation) if p.annotation is not p.empty else "",
                     "default": None if p.default is p.empty else p.default, "doc": ""})
    return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def check_int(owner: str, name: str, v: Any, lo: int) -> int:
    """``v`` as an int >= ``lo`` (a bool is not an int here), else a one-line FedLatentError."""
    import numpy as np

    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise FedLatentError(f"{owner}: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def check_number(owner: str, name: str, v: Any, positive: bool = False) -> float:
    """``v`` as a finite float >= 0 (> 0 with ``positive``), else a one-line FedLatentError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise FedLatentError(f"{owner}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


__all__ = ["config_class", "option_names", "make_config", "split_options", "coerce", "field_docs", "describe",
           "check_int", "check_number"]
