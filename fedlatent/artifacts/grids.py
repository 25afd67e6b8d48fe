"""Image grids of synthetic sets (PNG, atomic writes): per class, de-normalised."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..utils import atomic_write

def save_class_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, clients: torch.Tensor | None,
                    mean: Sequence[float], std: Sequence[float], class_names: Sequence[str], title: str = "",
                    max_cols: int = 40) -> None:
    """PNG: one row per class with that class's distilled images (de-normalised), ordered by client."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data import denormalize

    x = denormalize(images.detach().float().cpu(), mean, std)
    labels = labels.detach().cpu()
    clients = clients.detach().cpu() if clients is not None else torch.zeros_like(labels)
    k = len(class_names)
    rows = []
    for c in range(k):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.argsort(clients[idx], stable=True)][:max_cols]
        rows.append(idx)
    cols = max(1, max(len(r) for r in rows))
    C, H, W = x.shape[1:]
    pad = 1
    canvas = torch.ones(C, k * (H + pad) + pad, cols * (W + pad) + pad)
    for r, idx in enumerate(rows):
        for j, i in enumerate(idx.tolist()):
            top, left = pad + r * (H + pad), pad + j * (W + pad)
            canvas[:, top:top + H, left:left + W] = x[i]
    fig = Figure(figsize=(min(16.0, 1.5 + 0.35 * cols), 0.5 + 0.38 * k), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    img = canvas[0].numpy() if C == 1 else canvas.permute(1, 2, 0).numpy()
    ax.imshow(img, cmap="gray" if C == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * (H + pad) + H / 2 for r in range(k)])
    ax.set_yticklabels([str(n) for n in class_names], fontsize=7)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))



def save_pseudo_grid(path: str | os.PathLike, pseudo, mean: Sequence[float] | None,
                     std: Sequence[float] | None, class_names: Sequence[str], max_cols: int = 20) -> None:
    """PNG grid of the de-normalised pseudo images: one row per class (argmax of the soft label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data import denormalize

    x = pseudo.images.detach().float().cpu()
    if mean is not None and std is not None:
        x = denormalize(x, mean, std)
    else:  # no normalisation known: min-max per image
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-8)
    soft = pseudo.soft_labels.detach().cpu()
    conf, cls = soft.max(1)
    k = soft.shape[1]
    rows = [torch.nonzero(cls == c).flatten().tolist() for c in range(k)]
    cols = max(1, min(max_cols, max(len(r) for r in rows)))
    fig = Figure(figsize=(1.0 + 0.7 * cols, 0.75 * k + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    gray = x.shape[1] == 1
    for c, idx in enumerate(rows):
        for j in range(cols):
            ax = fig.add_subplot(k, cols, c * cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j == 0:
                name = class_names[c] if c < len(class_names) else str(c)
                ax.set_ylabel(f"{name} ({len(idx)})", rotation=0, ha="right", va="center", fontsize=7)
            if j < len(idx):
                img = x[idx[j]]
                ax.imshow(img[0].numpy() if gray else img.permute(1, 2, 0).numpy(), cmap="gray" if gray else None,
                          vmin=0, vmax=1)
                ax.set_title(f"{float(conf[idx[j]]):.2f}", fontsize=5, pad=1)
    fig.suptitle("DynaFed pseudo set (rows: argmax of soft label; title: its probability)", fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.35)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


# ---------------------------------------------------------------------------------------------
# Synthesis and fine-tuning



__all__ = ["save_class_grid", "save_pseudo_grid"]
