"""Per-round checkpoints of a simulation, and resuming from them (never pickle).

Layout inside a run folder::

    checkpoints/round_0003/tensors.safetensors   every tensor of the state (flattened names)
    checkpoints/round_0003/state.json            everything else (JSON), with the tensors' sha256 and the
                                                 RNG states (python, numpy, torch)
    checkpoints/latest.json                      {"round": 3, "dir": "round_0003"}: written last

Each file is written atomically (:func:`fedlatent.utils.atomic_write`) and ``latest.json`` only after both
files of its round exist, so a run killed at any point leaves the previous complete checkpoint as the
latest one. Only the newest ``keep`` checkpoints are kept.

A state is any nesting of dicts, lists, tuples, tensors, numpy arrays and JSON scalars (what
:meth:`fedlatent.fl.base.Strategy.state_dict` returns). :func:`encode_state` replaces every tensor by a
``{"__tensor__": key}`` reference into one flat safetensors dict; tuples and dicts with non-string keys
are tagged so that :func:`decode_state` returns the same structure.

The engine hook: :func:`fedlatent.fl.simulation.run_simulation` takes ``checkpoint_fn(rnd, strategy,
engine_state)`` (called after each recorded round) and ``resume`` (the dict :func:`resume_state` builds).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..utils import FedLatentError, atomic_write, atomic_write_text, sha256_file

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
FORMAT = "fedlatent.checkpoint/1"


# ---------------------------------------------------------------------------------------------
# state <-> (json tree, tensors)


def encode_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s") -> tuple[Any, dict]:
    """Split ``obj`` into a JSON-able tree and a flat name -> tensor dict (tensors are cloned to CPU)."""
    tensors = {} if tensors is None else tensors

    def enc(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            key = f"{path}#{len(tensors)}"
            tensors[key] = o.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(o, np.ndarray):
            key = f"{path}#{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(o)).clone()
            return {"__ndarray__": key}
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o) and not any(k.startswith("__") for k in o):
                return {k: enc(v, f"{path}.{k}") for k, v in o.items()}
            return {"__items__": [[enc(k, f"{path}.k{i}"), enc(v, f"{path}.v{i}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, torch.dtype):
            return {"__dtype__": str(o).replace("torch.", "")}
        raise FedLatentError(f"checkpoint: cannot store a {type(o).__name__} at {path}")

    return enc(obj, prefix), tensors


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    def dec(o: Any) -> Any:
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]].clone()
            if "__ndarray__" in o:
                return tensors[o["__ndarray__"]].numpy().copy()
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            if "__items__" in o:
                return {_hashable(dec(k)): dec(v) for k, v in o["__items__"]}
            if "__dtype__" in o:
                return getattr(torch, o["__dtype__"])
            return {k: dec(v) for k, v in o.items()}
        return o

    try:
        return dec(tree)
    except KeyError as e:
        raise FedLatentError(f"checkpoint: tensor {e} is missing from tensors.safetensors") from None


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, CUDA if initialised) as a JSON/tensor tree."""
    st = np.random.get_state()
    out: dict[str, Any] = {
        "python": _listify(random.getstate()),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` recorded."""
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])


def _listify(o: Any) -> Any:
    if isinstance(o, tuple):
        return [_listify(v) for v in o]
    return o


# ---------------------------------------------------------------------------------------------
# files


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


def save_checkpoint(run_dir: str | os.PathLike, rnd: int, strategy_state: Any, engine_state: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write the checkpoint of round ``rnd`` (strategy state, engine state, RNG states); returns its folder."""
    from ..utils import save_safetensors

    root = checkpoint_dir(run_dir)
    name = f"round_{int(rnd):04d}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "strategy": encode_state(strategy_state, tensors, "strategy")[0],
        "engine": encode_state(dict(engine_state), tensors, "engine")[0],
        "rng": encode_state(capture_rng(), tensors, "rng")[0],
        "extra": encode_state(dict(extra or {}), tensors, "extra")[0],
    }
    tpath = folder / "tensors.safetensors"
    save_safetensors(tpath, tensors, {"format": FORMAT})
    doc = {"format": FORMAT, "round": int(rnd), "tensors_sha256": sha256_file(tpath), "state": tree}
    atomic_write_text(folder / "state.json", json.dumps(doc, allow_nan=True))
    atomic_write_text(root / LATEST, json.dumps({"round": int(rnd), "dir": name}) + "\n")
    # keep the newest `keep` complete checkpoints
    rounds = sorted(p for p in root.glob("round_*") if p.is_dir() and p.name != name)
    for old in rounds[: max(0, len(rounds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return (checkpoint_dir(run_dir) / LATEST).is_file()


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The latest checkpoint of ``run_dir``: ``{"round", "strategy", "engine", "rng", "extra"}`` (decoded)."""
    from safetensors.torch import load_file

    root = checkpoint_dir(run_dir)
    latest = root / LATEST
    if not latest.is_file():
        raise FedLatentError(f"{run_dir}: no checkpoint to resume from ({latest} is missing)")
    try:
        ptr = json.loads(latest.read_text())
        folder = root / str(ptr["dir"])
        doc = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedLatentError(f"{run_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if doc.get("format") != FORMAT:
        raise FedLatentError(f"{folder}: not a fedlatent checkpoint (format {doc.get('format')!r})")
    tpath = folder / "tensors.safetensors"
    if not tpath.is_file() or sha256_file(tpath) != doc.get("tensors_sha256"):
        raise FedLatentError(f"{folder}: tensors.safetensors is missing or does not match state.json (damaged)")
    try:
        tensors = load_file(str(tpath))
    except Exception as e:  # noqa: BLE001
        raise FedLatentError(f"{tpath}: unreadable ({e})") from None
    st = doc["state"]
    return {"round": int(doc["round"]), "strategy": decode_state(st["strategy"], tensors),
            "engine": decode_state(st["engine"], tensors), "rng": decode_state(st["rng"], tensors),
            "extra": decode_state(st.get("extra", {}), tensors)}


def make_checkpoint_fn(run_dir: str | os.PathLike, every: int = 1, keep: int = 2,
                       extra: Mapping[str, Any] | None = None):
    """A ``checkpoint_fn(rnd, strategy, engine_state)`` for run_simulation: checkpoint every ``every`` rounds."""
    if every < 1:
        raise FedLatentError(f"checkpoint interval must be >= 1, got {every}")

    def fn(rnd: int, strategy, engine_state: Mapping[str, Any]) -> None:
        final = bool(engine_state.get("final"))
        if rnd % every == 0 or final:
            save_checkpoint(run_dir, rnd, strategy.state_dict(), engine_state, extra=extra, keep=keep)

    return fn


def resume_state(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The ``resume`` argument of run_simulation from a loaded checkpoint (restores the RNG states now)."""
    restore_rng(ckpt["rng"])
    eng = dict(ckpt["engine"])
    return {"round": int(ckpt["round"]), "strategy": ckpt["strategy"], "history": list(eng.get("history", [])),
            "rejections": list(eng.get("rejections", [])), "failures": list(eng.get("failures", [])),
            "totals": dict(eng.get("totals", {})), "wall_s": float(eng.get("wall_s", 0.0))}


__all__ = ["encode_state", "decode_state", "capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint",
           "has_checkpoint", "make_checkpoint_fn", "resume_state", "checkpoint_dir", "CKPT_DIR"]
