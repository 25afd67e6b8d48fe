"""The final global model of a run folder: ``model.safetensors`` (its state_dict), written at the end of a run.

The audits (:mod:`fedlatent.privacy.audit`) attack this model; older FedDGM run folders without it fall back to
the model in their last checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..utils import FedLatentError, save_safetensors

MODEL_FILE = "model.safetensors"


def save_global_model(run_dir: str | os.PathLike, strategy) -> Path | None:
    """Write ``strategy.eval_model()`` (one module) to RUN_DIR/model.safetensors; None for a dict of models."""
    model = strategy.eval_model()
    if not isinstance(model, nn.Module):
        return None
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(run_dir) / MODEL_FILE
    save_safetensors(path, state, metadata={"format": "fedlatent.model/1", "method": str(getattr(strategy, "name", ""))})
    return path


def load_global_state(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The final global model's state_dict of a finished run (model.safetensors, else the last checkpoint)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise FedLatentError(f"{path}: not a readable safetensors file ({e})") from None
    from ..fl.checkpoint import has_checkpoint, load_checkpoint

    if has_checkpoint(run_dir):
        st = load_checkpoint(run_dir).get("strategy", {})
        if isinstance(st, dict) and isinstance(st.get("model"), dict):
            return st["model"]
    raise FedLatentError(f"{run_dir}: no saved global model ({MODEL_FILE} or a checkpoint); rerun it with this "
                         "fedlatent version")


__all__ = ["MODEL_FILE", "save_global_model", "load_global_state"]
