"""Expert trajectories for MTT: networks trained on real data, one flat snapshot per epoch.

As the MTT reference's ``buffer.py``: SGD (lr 0.01, no momentum, no weight decay by default),
batch 256, DSA augmentation, a snapshot at initialisation and after every epoch. Stored as
safetensors: one ``[epochs + 1, num_params]`` tensor per expert plus metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import ImageData
from ..models import get_model
from ..models.functional import FlatModel
from ..errors import DivergedError, FedLatentError
from ..train import fit
from ..utils import derive_seed, save_safetensors, torch_generator
from .augment import DSA


def train_experts(model_name: str, data: ImageData, num_experts: int, epochs: int, lr: float = 0.01,
                  batch_size: int = 256, momentum: float = 0.0, weight_decay: float = 0.0,
                  augment: DSA | None = None, seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    """Train ``num_experts`` networks on ``data.x_train`` and return their trajectories.

    Each trajectory is a ``[epochs + 1, P]`` tensor (row 0 = initial weights). ``augment`` defaults
    to DSA with per-image parameters (as the reference's expert training); pass
    ``DSA('none')`` for none.
    """
    from tqdm import tqdm

    if num_experts < 1 or epochs < 1:
        raise FedLatentError(f"need num_experts >= 1 and epochs >= 1, got {num_experts} and {epochs}")
    if len(data.x_train) == 0:
        raise FedLatentError("no training images to train experts on")
    augment = augment if augment is not None else DSA(siamese=False)
    x, y = data.x_train, data.y_train
    trajectories = []
    for e in range(num_experts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "expert-init", e))
            model = get_model(model_name, data.channels, data.num_classes, data.image_size)
        flat = FlatModel(model)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        gen = torch_generator(seed, "expert-order", e)
        snaps = [flat.flatten()]
        model.train()
        bar = tqdm(range(epochs), desc=f"expert {e + 1}/{num_experts}", disable=not progress, leave=False)
        last: list[torch.Tensor] = []

        def keep(loss: torch.Tensor, _n: int) -> None:
            last[:] = [loss]  # the epoch's last minibatch loss, checked below

        def end_of_epoch(ep: int, e: int = e) -> None:
            loss = last[-1]
            if not torch.isfinite(loss.detach()):
                raise DivergedError(f"expert {e} diverged at epoch {ep} (loss {float(loss)}); lower the lr")
            bar.set_postfix(loss=f"{loss.item():.3f}")
            snaps.append(flat.flatten())

        fit(model, x, y, opt, epochs=bar, batch_size=batch_size, generator=gen, augment=augment,
            augment_seed=lambda ep, b, e=e: derive_seed(seed, "expert-aug", e, ep, b),
            on_step=keep, on_epoch_end=end_of_epoch)
        trajectories.append(torch.stack(snaps))
    return trajectories


def save_experts(path: str | Path, trajectories: list[torch.Tensor], meta: dict | None = None) -> None:
    """Save trajectories (list of [T, P] tensors) as safetensors with JSON metadata."""
    tensors = {f"expert_{i:04d}": t.detach().contiguous().cpu() for i, t in enumerate(trajectories)}
    md = {"format": "fedlatent-experts-v1", "meta": json.dumps(meta or {})}
    save_safetensors(path, tensors, md)


def load_experts(path: str | Path) -> tuple[list[torch.Tensor], dict]:
    """Load what :func:`save_experts` wrote: (trajectories, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FedLatentError(f"{path}: no such expert file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            keys = sorted(k for k in f.keys() if k.startswith("expert_"))
            trajs = [f.get_tensor(k) for k in keys]
    except Exception as e:  # safetensors raises several error types on corrupt files
        raise FedLatentError(f"{path}: not a readable safetensors expert file ({e})") from None
    if md.get("format") != "fedlatent-experts-v1" or not trajs:
        raise FedLatentError(f"{path}: not a fedlatent expert-trajectory file")
    if any(t.ndim != 2 or t.shape[1] != trajs[0].shape[1] for t in trajs):
        raise FedLatentError(f"{path}: expert trajectories have inconsistent shapes")
    try:
        meta = json.loads(md.get("meta", "{}"))
    except ValueError:
        meta = {}
    return trajs, meta


__all__ = ["train_experts", "save_experts", "load_experts"]
