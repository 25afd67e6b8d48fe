"""Membership inference against a trained model: threshold attacks and a LiRA-style calibrated attack.

Scores are "higher = more likely a member"; every attack is summarised by its ROC AUC and its TPR at 1 % FPR
(the low-FPR regime Carlini et al. 2022 argue is the meaningful one).

* ``loss``: -CE(f(x), y) (Yeom et al. 2018);
* ``confidence``: max softmax probability (Salem et al. 2019, label-free);
* ``lira``: Likelihood-ratio attack (Carlini et al. 2022, "Membership Inference Attacks From First Principles"),
  online, with K shadow models and a global (fixed) variance, the paper's choice for few shadows. The
  statistic is the logit-scaled true-class confidence phi = log p_y - log(1 - p_y) = z_y - logsumexp(z_{!=y}).
  Each shadow trains (same architecture, centralised SGD) on a seeded random half of the target candidates
  (members and non-members together), so every candidate is IN for about half of the shadows and OUT for the
  others; the score is log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out) with per-example means and variances
  pooled over all examples. An example that is IN (or OUT) for no shadow falls back to the pooled mean.

Written here rather than through ML Privacy Meter: its pip package drives attacks from its own dataset / model
wrappers, training loops and YAML configuration and has no federated notion of members; what is needed is the
statistic above over a model fedlatent already built, about forty lines.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils import torch_generator


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)
    finally:
        model.train(was)


def loss_score(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return (-F.cross_entropy(logits, y, reduction="none")).numpy()


def confidence_score(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(1).max(1).values.numpy()


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), computed stably as z_y - logsumexp over the other classes."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return (zy - torch.logsumexp(other, 1)).numpy()


def roc_metrics(scores: np.ndarray, is_member: np.ndarray, fpr_at: float = 0.01) -> dict:
    """AUC and TPR at ``fpr_at`` FPR (the largest TPR whose FPR does not exceed it) of a membership score."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-1e30, posinf=1e30, neginf=-1e30)
    fpr, tpr, _ = roc_curve(is_member, scores)
    ok = fpr <= fpr_at + 1e-12
    return {"auc": float(roc_auc_score(is_member, scores)), "tpr_at_1fpr": float(tpr[ok].max()) if ok.any() else 0.0,
            "members": int(is_member.sum()), "non_members": int((1 - is_member).sum())}


def threshold_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, is_member: np.ndarray) -> dict:
    z = logits_of(model, x)
    return {"loss": roc_metrics(loss_score(z, y), is_member),
            "confidence": roc_metrics(confidence_score(z), is_member)}


def train_shadow(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int, generator: torch.Generator) -> nn.Module:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def lira(target: nn.Module, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, is_member: np.ndarray,
         *, shadows: int = 4, epochs: int = 15, lr: float = 0.01, batch_size: int = 64, seed: int = 0,
         progress: bool = False) -> dict:
    """Online LiRA with ``shadows`` shadow models and global variances (see the module docstring)."""
    from tqdm.auto import tqdm

    n = len(y)
    phi_t = logit_confidence(logits_of(target, x), y)
    phis = np.zeros((shadows, n))
    ins = np.zeros((shadows, n), dtype=bool)
    for k in tqdm(range(shadows), desc="LiRA shadow models", disable=not progress, leave=False):
        g = torch_generator(seed, "privacy", "lira", k)
        keep = torch.randperm(n, generator=g)[: n // 2]
        ins[k, keep.numpy()] = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            m = train_shadow(build, x[keep], y[keep], epochs=epochs, lr=lr, batch_size=batch_size, generator=g)
        phis[k] = logit_confidence(logits_of(m, x), y)
    n_in, n_out = ins.sum(0), (~ins).sum(0)
    pooled_in, pooled_out = phis[ins].mean(), phis[~ins].mean()
    mu_in = np.where(n_in > 0, (phis * ins).sum(0) / np.maximum(n_in, 1), pooled_in)
    mu_out = np.where(n_out > 0, (phis * ~ins).sum(0) / np.maximum(n_out, 1), pooled_out)
    # global variances (Carlini et al. 2022, "fixed variance" for few shadows)
    s_in = float(np.sqrt(((phis - mu_in)[ins] ** 2).mean())) + 1e-6
    s_out = float(np.sqrt(((phis - mu_out)[~ins] ** 2).mean())) + 1e-6
    score = (-0.5 * ((phi_t - mu_in) / s_in) ** 2 - math.log(s_in)) - (-0.5 * ((phi_t - mu_out) / s_out) ** 2
                                                                     - math.log(s_out))
    out = roc_metrics(score, is_member)
    out.update({"shadows": shadows, "shadow_epochs": epochs, "sigma_in": s_in, "sigma_out": s_out})
    return out


__all__ = ["logits_of", "loss_score", "confidence_score", "logit_confidence", "roc_metrics", "threshold_attacks",
           "train_shadow", "lira"]
