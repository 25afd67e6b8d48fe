"""Heterogeneous clients: which architecture each client trains.

``FLConfig.client_models`` (``fedlatent simulate --client-models``) takes one of:

* a list of ``SPEC@WEIGHT`` entries separated by ``;`` or ``,``, e.g.
  ``convnet@0.5,resnet18@0.3,vgg11@0.2`` or ``convnet:width=32,depth=2@0.6;vgg11@0.4``. ``SPEC`` is a
  :func:`fedlatent.models.get_model` spec (it may hold options with commas; ``@`` separates the weight,
  and a separator is only recognised right after a weight). Weights are either fractions summing to 1,
  turned into exact client counts by largest-remainder (Hamilton) rounding with ties going to the
  entry listed first, or integer client counts summing to the number of clients;
* a single spec without ``@`` (every client uses it);
* the path of a JSON file ``{"0": "convnet", "1": "resnet18", ...}`` naming the spec of every client
  (each client id from 0 to K-1 exactly once).

Fractions/counts are assigned to clients through a seeded permutation (stream (seed, "client-models")),
so one seed fixes the assignment, independently of the partition and of the method.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.partition import _apportion
from ..models import MODELS, parse_model_spec
from ..utils import FedLatentError, numpy_rng

_WEIGHT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:[,;]\s*|$)")


def _check_spec(spec: str, where: str) -> str:
    spec = spec.strip()
    if not spec:
        raise FedLatentError(f"empty model spec in {where!r}")
    name, _ = parse_model_spec(spec)
    if name not in MODELS:
        raise FedLatentError(f"unknown architecture {name!r} in {where!r}; choose one of {', '.join(MODELS)}")
    return spec


def parse_client_models(text: str) -> list[tuple[str, float]]:
    """``"convnet@0.5;resnet18@0.5"`` -> ``[("convnet", 0.5), ("resnet18", 0.5)]`` (see the module docstring).

    A text without ``@`` is one spec with weight 1. Raises FedLatentError on malformed input, unknown
    architectures, negative weights or a spec listed twice.
    """
    text = str(text).strip()
    if "@" not in text:
        return [(_check_spec(text, text), 1.0)]
    out: list[tuple[str, float]] = []
    rest = text
    while rest.strip():
        spec, at, tail = rest.partition("@")
        if not at:
            raise FedLatentError(f"--client-models entry {spec.strip()!r} has no @WEIGHT (in {text!r})")
        m = _WEIGHT.match(tail)
        if m is None:
            raise FedLatentError(f"--client-models: expected a number after '{spec.strip()}@' in {text!r}")
        spec = _check_spec(spec, text)
        if any(spec == s for s, _ in out):
            raise FedLatentError(f"--client-models lists {spec!r} twice")
        out.append((spec, float(m.group(1))))
        rest = tail[m.end():]
    return out


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Non-negative integers summing to ``total``, proportional to ``weights`` (Hamilton rounding).

    Each entry gets ``floor(w_i / sum(w) * total)``; the units left go to the largest remainders,
    ties to the lower index.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise FedLatentError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    return [int(c) for c in _apportion(w, int(total), np.full(len(w), int(total), dtype=np.int64))]


def architecture_counts(entries: Sequence[tuple[str, float]], num_clients: int) -> list[int]:
    """Clients per entry: fractions summing to 1 -> largest remainder; integer counts summing to K -> as given."""
    weights = [w for _, w in entries]
    total = math.fsum(weights)
    if abs(total - 1.0) <= 1e-6:
        return largest_remainder(weights, num_clients)
    if all(float(w).is_integer() for w in weights) and int(total) == num_clients:
        return [int(w) for w in weights]
    raise FedLatentError(f"--client-models weights must be fractions summing to 1 or client counts summing to "
                         f"{num_clients}; got {', '.join(f'{w:g}' for w in weights)} (sum {total:g})")


def load_mapping(path: str | Path, num_clients: int) -> list[str]:
    """Read a JSON file ``{client_id: spec}`` that names the spec of every client 0..K-1."""
    p = Path(path).expanduser()
    try:
        raw = json.loads(p.read_text())
    except OSError as e:
        raise FedLatentError(f"cannot read client-models file {p}: {e.strerror or e}") from None
    except ValueError as e:
        raise FedLatentError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise FedLatentError(f"{p}: expected a JSON object {{client_id: model spec}}, got {type(raw).__name__}")
    specs: dict[int, str] = {}
    for k, v in raw.items():
        try:
            cid = int(str(k).strip())
        except ValueError:
            raise FedLatentError(f"{p}: client id {k!r} is not an integer") from None
        if cid in specs:
            raise FedLatentError(f"{p}: client {cid} listed twice")
        if not isinstance(v, str):
            raise FedLatentError(f"{p}: the model of client {cid} must be a spec string, got {type(v).__name__}")
        specs[cid] = _check_spec(v, str(p))
    missing = sorted(set(range(num_clients)) - set(specs))
    extra = sorted(set(specs) - set(range(num_clients)))
    if missing or extra:
        raise FedLatentError(f"{p}: must name every client 0..{num_clients - 1} exactly once "
                             f"(missing {missing[:10]}, unknown {extra[:10]})")
    return [specs[c] for c in range(num_clients)]


def _is_mapping_file(text: str) -> bool:
    t = text.strip()
    return t.lower().endswith(".json") or ("@" not in t and Path(t).expanduser().is_file())


def assign_architectures(client_models: str | None, num_clients: int, seed: int) -> list[str] | None:
    """The model spec of every client (index = client id), or None when ``client_models`` is None.

    Deterministic in ``seed``: the clients are put in the order of a seeded permutation and the
    entries, in the order given, take consecutive blocks of their counts.
    """
    if client_models is None:
        return None
    text = str(client_models)
    if _is_mapping_file(text):
        return load_mapping(text, num_clients)
    entries = parse_client_models(text)
    counts = architecture_counts(entries, num_clients)
    perm = numpy_rng(seed, "client-models").permutation(num_clients)
    out: list[str] = [""] * num_clients
    start = 0
    for (spec, _), n in zip(entries, counts):
        for cid in perm[start : start + n]:
            out[int(cid)] = spec
        start += n
    return out


def arch_labels(specs: Sequence[str]) -> dict[str, str]:
    """Short column-safe labels: the architecture name when it is unique among ``specs``, else name + options.

    ``["convnet", "resnet18"]`` -> ``{"convnet": "convnet", "resnet18": "resnet18"}``;
    ``["convnet:width=8", "convnet:width=16"]`` -> ``convnet_width8`` / ``convnet_width16``.
    """
    parsed = {s: parse_model_spec(s) for s in specs}
    names = [n for n, _ in parsed.values()]
    labels: dict[str, str] = {}
    for s, (name, kw) in parsed.items():
        if names.count(name) == 1:
            label = name
        else:
            label = "_".join([name, *(f"{k}{v}" for k, v in kw.items())])
        label = re.sub(r"[^A-Za-z0-9_.-]+", "", label)
        labels[s] = label
    seen: dict[str, int] = {}
    for s in labels:  # two spellings of one model ("convnet:width=8" / "convnet:width=08"): keep them apart
        n = seen.get(labels[s], 0)
        seen[labels[s]] = n + 1
        if n:
            labels[s] = f"{labels[s]}_{n + 1}"
    return labels


def architecture_summary(client_models: Sequence[str]) -> dict[str, int]:
    """spec -> number of clients, in order of first use."""
    out: dict[str, int] = {}
    for s in client_models:
        out[s] = out.get(s, 0) + 1
    return out


__all__ = ["parse_client_models", "largest_remainder", "architecture_counts", "load_mapping", "assign_architectures",
           "arch_labels", "architecture_summary"]
