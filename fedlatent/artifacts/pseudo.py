"""DynaFed's pseudo set: the container and its file, the distilled-set format (:mod:`fedlatent.export`) with
soft labels, the learned student lr and the synthesis loss; files of the earlier ``fedlatent.dynafed.pseudo/1``
format still load."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import FedLatentError
from ..export import load_distilled, save_distilled


@dataclass
class PseudoSet:
    """DynaFed's synthetic data: images (normalised input space), soft-label logits, learned lr.

    ``lr`` is the learned student step size in the reference's units (on the class-mean KD
    loss; on the cross-entropy it is ``lr / num_classes``).
    """

    images: torch.Tensor
    label_logits: torch.Tensor
    lr: float

    @property
    def soft_labels(self) -> torch.Tensor:
        return torch.softmax(self.label_logits, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: str | torch.device) -> "PseudoSet":
        return PseudoSet(self.images.to(device), self.label_logits.to(device), self.lr)

    def clone(self) -> "PseudoSet":
        return PseudoSet(self.images.detach().clone(), self.label_logits.detach().clone(), float(self.lr))


def save_pseudo_set(path: str | os.PathLike, pseudo: PseudoSet, metadata: dict[str, Any] | None = None,
                    losses: Sequence[float] | None = None) -> None:
    """Write ``pseudo`` (atomic) as a distilled set: images, soft-label logits (and their softmax), lr,
    synthesis loss; ``metadata`` (JSON values) goes into the file's ``extra["dynafed"]``, its ``dataset``,
    ``class_names``, ``mean``, ``std``, ``ipc`` and ``seed`` also into the format's own fields."""
    md = dict(metadata or {})
    k, c = int(pseudo.label_logits.shape[1]), int(pseudo.images.shape[1])
    save_distilled(path, pseudo.images.detach().float(), pseudo.label_logits.detach().float(),
                   dataset=md.get("dataset") or "", class_names=md.get("class_names") or [str(i) for i in range(k)],
                   mean=md.get("mean") or [0.0] * c, std=md.get("std") or [1.0] * c, ipc=md.get("ipc"),
                   seed=md.get("seed"), extra={"method": "dynafed", "dynafed": md}, lr=float(pseudo.lr),
                   loss_history=list(losses or []))


def load_pseudo_set(path: str | os.PathLike) -> tuple[PseudoSet, dict[str, Any], list[float]]:
    """Read a pseudo set written by :func:`save_pseudo_set` (or an earlier ``fedlatent.dynafed.pseudo/1`` file):
    (pseudo set, metadata, synthesis losses)."""
    ds, meta = load_distilled(path)
    if ds.labels is None or not ds.labels.dtype.is_floating_point or ds.lr is None:
        raise FedLatentError(f"{path}: not a DynaFed pseudo set (needs soft labels and a learned lr)")
    extra = meta["extra"]
    info = dict(extra["dynafed"]) if "dynafed" in extra else {k: v for k, v in extra.items() if k != "legacy_format"}
    return PseudoSet(ds.images, ds.labels, float(ds.lr)), info, list(ds.loss_history or [])


__all__ = ["PseudoSet", "save_pseudo_set", "load_pseudo_set"]
