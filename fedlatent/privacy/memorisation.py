"""Memorisation audit of a synthetic set: is a synthetic image closer to the clients' images than to unseen ones?

For a synthetic image s of class y (the distance-to-closest-record test used to audit synthetic data, with a
held-out reference so that the distances have a scale):

    d_mem(s) = min over the clients' training images x of class y of ||phi(s) - phi(x)||,
    d_out(s) = min over held-out images h of class y of ||phi(s) - phi(h)||,
    ratio(s) = d_mem(s) / d_out(s),

in two spaces phi: pixels (de-normalised to [0, 1], RMS distance) and the L2-normalised penultimate features of
a fixed extractor trained on public data (:mod:`fedlatent.privacy.features`). Ratios well below 1 mean the set
sits closer to the clients' data than to fresh data of the class. Because the client pool is usually larger
than the held-out one, even fresh images get ratios below 1: the *control* ratio, the same statistic for
real images no client and no reference saw (``control`` rows), is what a non-memorising set should match.

A near-copy is flagged when, in either space, d_mem(s) is below ``copy_quantile`` (default 1 %) of the same
distance for the held-out images themselves: s is closer to a client's training image than 99 % of genuinely
unseen images of its class are. By construction an image that copies nothing is flagged with probability about
``copy_quantile`` per space (up to twice that in either space), so a few flags in a set of hundreds are expected
at chance; the flags are for looking at the pairs (``closest_pairs.png``), an exact or near-exact copy has a
distance near 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch



def nearest(q: torch.Tensor, ref: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each row of ``q`` to its nearest row of ``ref`` (Euclidean; flattened)."""
    q = q.reshape(len(q), -1).float()
    ref = ref.reshape(len(ref), -1).float()
    if len(ref) == 0:
        return torch.full((len(q),), math.inf), torch.full((len(q),), -1, dtype=torch.long)
    ds, ix = [], []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i:i + chunk], ref)
        m, j = d.min(1)
        ds.append(m)
        ix.append(j)
    return torch.cat(ds), torch.cat(ix)


@dataclass
class SpaceResult:
    d_mem: np.ndarray        # NN distance to the clients' images of the class
    d_out: np.ndarray        # NN distance to the held-out reference of the class
    idx_mem: np.ndarray      # index (into the member set) of that nearest client image
    threshold: np.ndarray    # per synthetic image: the near-copy threshold of its class
    ratio: np.ndarray
    control_ratio: np.ndarray  # the ratio of real unseen images (chance level)

    def summary(self) -> dict:
        r = self.ratio[np.isfinite(self.ratio)]
        q = (lambda p: float(np.quantile(r, p))) if len(r) else (lambda p: math.nan)
        c = self.control_ratio[np.isfinite(self.control_ratio)]
        return {"ratio_median": q(0.5), "ratio_p05": q(0.05), "ratio_p25": q(0.25), "ratio_p75": q(0.75),
                "ratio_min": float(r.min()) if len(r) else math.nan,
                "frac_ratio_below_1": float((r < 1).mean()) if len(r) else math.nan,
                "frac_ratio_below_0.5": float((r < 0.5).mean()) if len(r) else math.nan,
                "control_ratio_median": float(np.median(c)) if len(c) else math.nan,
                "control_ratio_p05": float(np.quantile(c, 0.05)) if len(c) else math.nan,
                "flagged": int((self.d_mem < self.threshold).sum())}


def audit_space(syn: torch.Tensor, syn_y: torch.Tensor, mem: torch.Tensor, mem_y: torch.Tensor, out: torch.Tensor,
                out_y: torch.Tensor, *, control: torch.Tensor | None = None, control_y: torch.Tensor | None = None,
                copy_quantile: float = 0.01) -> SpaceResult:
    """The nearest-neighbour statistics of ``syn`` in one space (rows already embedded / flattened)."""
    n = len(syn)
    res = {k: np.full(n, math.nan) for k in ("d_mem", "d_out", "threshold")}
    idx = np.full(n, -1, dtype=np.int64)
    ctrl = []
    for c in torch.unique(torch.cat([syn_y, control_y if control_y is not None else syn_y[:0]])).tolist():
        s_idx = (syn_y == c).nonzero().flatten()
        m_idx = (mem_y == c).nonzero().flatten()
        o_idx = (out_y == c).nonzero().flatten()
        if len(m_idx) == 0 or len(o_idx) == 0:
            continue
        if control is not None:
            k_idx = (control_y == c).nonzero().flatten()
            if len(k_idx):
                cm, _ = nearest(control[k_idx], mem[m_idx])
                co, _ = nearest(control[k_idx], out[o_idx])
                ctrl.append((cm / co).numpy())
        if len(s_idx) == 0:
            continue
        s = syn[s_idx]
        d_mem, j = nearest(s, mem[m_idx])
        d_out, _ = nearest(s, out[o_idx])
        # calibration: how close do genuinely unseen images of class c come to the clients' images?
        h, _ = nearest(out[o_idx], mem[m_idx])
        si = s_idx.numpy()
        res["d_mem"][si] = d_mem.numpy()
        res["d_out"][si] = d_out.numpy()
        res["threshold"][si] = float(np.quantile(h.numpy(), copy_quantile))
        idx[si] = m_idx[j].numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = res["d_mem"] / res["d_out"]
    return SpaceResult(res["d_mem"], res["d_out"], idx, res["threshold"], ratio,
                       np.concatenate(ctrl) if ctrl else np.zeros(0))


def memorisation_audit(syn: torch.Tensor, syn_y: torch.Tensor, mem: torch.Tensor, mem_y: torch.Tensor,
                       out: torch.Tensor, out_y: torch.Tensor, *, control: torch.Tensor | None = None,
                       control_y: torch.Tensor | None = None, extractor=None, copy_quantile: float = 0.01) -> dict:
    """Memorisation statistics of a synthetic set (images in [0, 1], NCHW) in pixel and feature space.

    Returns {"n_synthetic", "pixel": {...}, "feature": {...} (when ``extractor``), "near_copies", "flags" (per
    image: flagged in either space), "spaces": {name: SpaceResult}}; see the module docstring.
    """
    d = math.sqrt(float(np.prod(syn.shape[1:])))
    ctl = None if control is None else control / d
    spaces = {"pixel": audit_space(syn / d, syn_y, mem / d, mem_y, out / d, out_y, control=ctl, control_y=control_y,
                                   copy_quantile=copy_quantile)}
    if extractor is not None:
        f = extractor.embed
        spaces["feature"] = audit_space(f(syn), syn_y, f(mem), mem_y, f(out), out_y,
                                        control=None if control is None else f(control), control_y=control_y,
                                        copy_quantile=copy_quantile)
    flags = np.zeros(len(syn), dtype=bool)
    for r in spaces.values():
        flags |= r.d_mem < r.threshold
    return {"n_synthetic": int(len(syn)), **{k: v.summary() for k, v in spaces.items()},
            "near_copies": int(flags.sum()), "flags": flags, "spaces": spaces, "copy_quantile": copy_quantile}


def plot_closest_pairs(path, syn: torch.Tensor, mem: torch.Tensor, result: dict, k: int = 16,
                       class_names: Sequence[str] | None = None, syn_y: torch.Tensor | None = None) -> None:
    """PNG: the ``k`` synthetic images with the smallest pixel-space d_mem / near-copy threshold, each next to its
    nearest client training image (images in [0, 1])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..utils import atomic_write

    sp = result["spaces"]["pixel"]
    score = sp.d_mem / np.maximum(sp.threshold, 1e-12)
    order = [i for i in np.argsort(score) if sp.idx_mem[i] >= 0][:k]
    n = max(len(order), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.4 * cols, 1.45 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)

    def show(ax, img):
        img = img.detach().float().clamp(0, 1).cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])

    for t, i in enumerate(order):
        r, c = divmod(t, cols)
        a1 = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 1)
        a2 = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 2)
        show(a1, syn[i])
        show(a2, mem[sp.idx_mem[i]])
        flag = " COPY" if result["flags"][i] else ""
        lab = ""
        if syn_y is not None and class_names is not None:
            lab = f"{class_names[int(syn_y[i])]} "
        a1.set_title(f"{lab}syn {i}{flag}", fontsize=6)
        a2.set_title(f"client img, d/thr {score[i]:.2f}", fontsize=6)
    fig.suptitle("closest synthetic / client-training pairs (pixel space; left synthetic, right nearest member)",
                 fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


__all__ = ["nearest", "audit_space", "memorisation_audit", "plot_closest_pairs", "SpaceResult"]
