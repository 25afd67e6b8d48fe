"""The fixed feature extractor of the memorisation audit, trained on public data only.

Public data: the first half of a seeded, class-stratified split of the data set's *test* set. No client ever
trains on a test image, so this half is public with respect to every client; the other half is the audit's
held-out reference (non-members). The extractor is a ConvNet-D3 (width 32, instance norm) trained with SGD for
``epochs`` epochs from a seeded initialisation; its features are the L2-normalised penultimate activations.

It is deterministic (one seed fixes split, initialisation and batch order) and cached as safetensors under
``$FEDLATENT_CACHE/privacy`` (default ``~/.cache/fedlatent/privacy``), keyed by the data set, the image shape,
a hash of the public labels and the training settings, so every audit of a data set uses the same extractor.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils import derive_seed, numpy_rng, torch_generator

EXTRACTOR_SPEC = "convnet-d3:width=32"


def heldout_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(public_idx, reference_idx): a seeded class-stratified half split of the test-set ``labels``."""
    labels = np.asarray(labels)
    pub, ref = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[numpy_rng(seed, "privacy", "heldout", int(c)).permutation(len(idx))]
        h = len(idx) // 2
        pub.append(idx[:h])
        ref.append(idx[h:])
    return np.sort(np.concatenate(pub)), np.sort(np.concatenate(ref))


def cache_dir() -> Path:
    root = os.environ.get("FEDLATENT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fedlatent") / "privacy"


class Extractor:
    """Penultimate-layer features of a classifier, L2-normalised (``embed`` takes images in [0, 1])."""

    def __init__(self, model: nn.Module, mean, std):
        self.model = model.eval()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @torch.no_grad()
    def embed(self, x01: torch.Tensor, batch: int = 500) -> torch.Tensor:
        out = []
        for i in range(0, len(x01), batch):
            xb = (x01[i:i + batch].float() - self.mean) / self.std
            out.append(F.normalize(penultimate(self.model, xb).flatten(1), dim=1))
        return torch.cat(out) if out else torch.zeros(0, 1)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's last linear layer (ConvNet: ``features`` then flatten)."""
    if hasattr(model, "features"):
        return model.features(x).flatten(1)
    return x.flatten(1)  # pragma: no cover - fallback for foreign models


def public_extractor(x_pub: torch.Tensor, y_pub: torch.Tensor, num_classes: int, mean, std, *, name: str,
                     epochs: int = 15, seed: int = 0, cache: bool = True, progress: bool = False) -> Extractor:
    """Train (or load from the cache) the extractor on the public images ``x_pub`` (normalised input space)."""
    from safetensors.torch import load_file, save_file

    from ..models import get_model
    from ..utils import atomic_write

    c, h = int(x_pub.shape[1]), int(x_pub.shape[-1])
    key = hashlib.sha256(repr((name, c, h, num_classes, EXTRACTOR_SPEC, epochs, seed,
                               hashlib.sha256(y_pub.cpu().numpy().tobytes()).hexdigest(),
                               float(x_pub.double().sum()))).encode()).hexdigest()[:16]
    path = cache_dir() / f"extractor-{name.replace('/', '_').replace(':', '_')}-{h}px-{key}.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "privacy", "extractor", "init"))
        model = get_model(EXTRACTOR_SPEC, c, num_classes, h)
    if cache and path.is_file():
        model.load_state_dict(load_file(str(path)))
        return Extractor(model, mean, std)
    from tqdm.auto import tqdm

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch_generator(seed, "privacy", "extractor", "batches")
    model.train()
    n = len(y_pub)
    for _ in tqdm(range(epochs), desc="feature extractor (public half of the test set)", disable=not progress,
                  leave=False):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x_pub[idx]), y_pub[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda p: save_file(state, p))
    return Extractor(model, mean, std)


__all__ = ["heldout_split", "public_extractor", "Extractor", "cache_dir", "EXTRACTOR_SPEC"]
