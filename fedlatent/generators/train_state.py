"""The resumable state of ``fedlatent pretrain``: every network, optimiser and random stream in one safetensors file
with JSON metadata (never pickle), so a stopped training continues bit for bit."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import FedLatentError, atomic_write

from .builtin import BuiltinConfig

# --- resumable training state (safetensors + JSON metadata; never pickle) -----------------------------------
STATE_FORMAT = "fedlatent-pretrain-state"
STATE_VERSION = "1"


def _opt_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
    return out


def _load_opt(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_train_state(path: str | os.PathLike, *, G: nn.Module, G_ema: nn.Module, D: nn.Module,
                     opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, rngs: dict[str, torch.Generator],
                     step: int, seconds: float, gen_cfg: BuiltinConfig, cfg: Any, info: dict, history: list,
                     curve: list, cpu_seconds: float = 0.0) -> None:
    """Everything needed to continue a run bit-for-bit: weights of G, G_ema and D, both Adam states, every RNG
    state (the data / latent / augmentation streams and torch's global one), the step and the training time."""
    from safetensors.torch import save_file

    t: dict[str, torch.Tensor] = {}
    for pre, mod in (("G", G), ("G_ema", G_ema), ("D", D)):
        t.update({f"{pre}.{k}": v.detach().cpu().contiguous().clone() for k, v in mod.state_dict().items()})
    t.update(_opt_tensors("opt_g", opt_g))
    t.update(_opt_tensors("opt_d", opt_d))
    for k, g in rngs.items():
        t[f"rng.{k}"] = g.get_state().clone()
    t["rng.torch_global"] = torch.get_rng_state().clone()
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": str(int(step)), "seconds": repr(float(seconds)),
            "cpu_seconds": repr(float(cpu_seconds)),
            "gen_config": json.dumps(asdict(gen_cfg), sort_keys=True),
            "train_config": json.dumps(asdict(cfg), sort_keys=True),
            "info": json.dumps(info, sort_keys=True), "history": json.dumps(history), "curve": json.dumps(curve)}
    atomic_write(path, lambda p: save_file(t, p, metadata=meta))


def read_train_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with JSON fields decoded, tensors) of a training state written by :func:`save_train_state`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FedLatentError(f"training checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:
        raise FedLatentError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if meta.get("format") != STATE_FORMAT:
        raise FedLatentError(f"{path}: not a fedlatent pretrain training checkpoint (format={meta.get('format')!r}); "
                             "--resume takes the *.train.safetensors file, not the exported generator")
    try:
        for k in ("gen_config", "train_config", "info", "history", "curve"):
            meta[k] = json.loads(meta[k])
        meta["step"], meta["seconds"] = int(meta["step"]), float(meta["seconds"])
        meta["cpu_seconds"] = float(meta.get("cpu_seconds", "nan"))
    except (KeyError, ValueError) as e:
        raise FedLatentError(f"{path}: damaged training-checkpoint metadata ({type(e).__name__}: {e})") from None
    return meta, tensors


def state_path_for(out: str | os.PathLike) -> Path:
    """Default training-state path next to an exported generator: ``x.safetensors`` -> ``x.train.safetensors``."""
    out = Path(out)
    return out.with_name(out.name[: -len(".safetensors")] + ".train.safetensors" if out.name.endswith(".safetensors")
                         else out.name + ".train.safetensors")
