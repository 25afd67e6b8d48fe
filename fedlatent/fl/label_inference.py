"""Which classes a client trained on, read from its upload: the server's side of label leakage.

A client training a softmax classifier with cross-entropy changes the output bias by
``b_c <- b_c - lr * mean_i (p_ic - y_ic)`` at every step. For a class the client does not hold, ``y_ic = 0`` and
the bias falls at every step (plain SGD; momentum keeps the sign, weight decay can blur it); a class's bias rises
only while its share of the client's labels exceeds the model's mean predicted probability for it. So over a
local trajectory ``Delta b_c = b_c(end) - b_c(start) > 0`` marks the classes the client holds (Zhao et al.,
"iDLG", 2020, read the labels off one gradient the same way; here it is read off the start/end parameters that
FedDGM's clients upload anyway).

FedDGM's ``classes="inferred"`` (:class:`fedlatent.fl.methods.feddgm.FedDGMConfig`) spends each client's
distillation budget on those classes instead of on every class: under strong label skew a client's trajectory
says little about the classes it never saw, so their latents barely move. It uses nothing beyond the upload; with
DP-SGD clients (``FLConfig.dp``) the inference is noisier.
"""
from __future__ import annotations

import torch

from ..errors import FedLatentError
from ..models.functional import FlatModel

#: the flat-parameter name of the output layer's bias in fedlatent's ConvNets
BIAS = "classifier.bias"


def bias_change(flat: FlatModel, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``Delta b = b(end) - b(start)`` of the output layer, one entry per class."""
    ps, pe = flat.params(start), flat.params(end)
    if BIAS not in ps:
        raise FedLatentError(f"classes='inferred' reads the output bias {BIAS!r}, which "
                             f"{type(flat.model).__name__} does not have")
    return (pe[BIAS] - ps[BIAS]).detach().float()


def present_classes(delta_bias: torch.Tensor) -> torch.Tensor:
    """Classes whose bias rose (``Delta b_c > 0``), largest rise first; if none rose, the one that fell least."""
    order = torch.argsort(delta_bias, descending=True, stable=True)
    up = order[delta_bias[order] > 0]
    return up if len(up) else order[:1]


def allocate(budget: int, classes: torch.Tensor) -> torch.Tensor:
    """``budget`` labels spread evenly over ``classes`` (in the given order, which gets the remainder first),
    sorted by class: e.g. 20 images over classes [3, 7, 1] -> 7 of class 3, 7 of class 7, 6 of class 1."""
    n = len(classes)
    if budget < n:
        raise FedLatentError(f"a budget of {budget} images cannot cover {n} classes")
    counts = torch.full((n,), budget // n, dtype=torch.long)
    counts[: budget % n] += 1
    cls, idx = torch.sort(classes.long())
    return cls.repeat_interleave(counts[idx])


def client_labels(flat: FlatModel, start: torch.Tensor, end: torch.Tensor, budget: int) -> torch.Tensor:
    """The labels of a client's synthetic set under ``classes="inferred"``: ``budget`` images over the classes
    its upload shows it trained on (:func:`present_classes`, :func:`allocate`)."""
    return allocate(budget, present_classes(bias_change(flat, start, end)))


__all__ = ["bias_change", "present_classes", "allocate", "client_labels"]
