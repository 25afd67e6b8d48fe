"""Pixel-space MTT: initialise a synthetic set, distil it against expert trajectories, evaluate it.

* :func:`init_synthetic` -- ``ipc`` images per class from random real samples (MTT's default) or
  Gaussian noise (DynaFed), with hard labels ``[0]*ipc + [1]*ipc + ...``.
* :func:`evaluate_synthetic` -- train fresh networks on the synthetic set only (DSA each batch, SGD
  momentum 0.9, weight decay 5e-4, lr divided by 10 after half the epochs, as the MTT reference's
  evaluation; lr = the learned lr) and report test accuracy mean +- std over seeds.
* :func:`distill_pixels` -- distil and evaluate, given data and expert trajectories;
* :func:`run_pixel_mtt` -- the whole pipeline ``fedlatent distill-pixels`` runs: per-class subsetting, ZCA,
  experts (trained and cached in the output folder, or loaded), distillation, evaluation, and the output
  folder (the distilled set in the one distilled-set format of :mod:`fedlatent.export`, a grid, metrics.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import ImageData
from ..models import get_model
from ..synthetic import PixelSet
from ..train import evaluate, fit_on_set, schedule_lr  # noqa: F401 - fit_on_set re-exported (old path)
from ..utils import FedLatentError, derive_seed, numpy_rng, torch_generator
from .augment import DSA
from .distiller import DistillConfig, Distiller, TrajectorySampler


def init_synthetic(data: ImageData, ipc: int, init: str = "real", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [C*ipc, ...], labels [C*ipc])`` ordered by class."""
    if ipc < 1:
        raise FedLatentError(f"ipc must be >= 1, got {ipc}")
    if init not in ("real", "noise"):
        raise FedLatentError(f"init must be 'real' or 'noise', got {init!r}")
    K = data.num_classes
    labels = torch.arange(K).repeat_interleave(ipc)
    if init == "noise":
        g = torch_generator(seed, "syn-init-noise")
        return torch.randn((K * ipc,) + tuple(data.x_train.shape[1:]), generator=g), labels
    rng = numpy_rng(seed, "syn-init-real")
    y = data.y_train.numpy()
    imgs = []
    for c in range(K):
        idx = np.flatnonzero(y == c)
        if len(idx) < ipc:
            raise FedLatentError(f"class {c} ({data.classes[c]}) has {len(idx)} training images, fewer than ipc={ipc}")
        imgs.append(data.x_train[torch.from_numpy(rng.choice(idx, ipc, replace=False))])
    return torch.cat(imgs).clone(), labels


def train_on(images: torch.Tensor, labels: torch.Tensor, arch: str, data: ImageData, epochs: int, lr: float,
             seed: int, batch_size: int = 256, dsa: bool = True) -> torch.nn.Module:
    """Train a fresh ``arch`` on (images, labels) -- labels int or soft-label logits -- with SGD
    (momentum 0.9, weight decay 5e-4) and a 10x lr decay after half the epochs (reference evaluation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "eval-init"))
        net = get_model(arch, data.channels, data.num_classes, data.image_size)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    fit_on_set(net, images, labels, opt, epochs=epochs, batch_size=batch_size,
               augment=DSA(siamese=False) if dsa else None, generator=torch_generator(seed, "eval-order"),
               on_epoch=schedule_lr(opt, "step", epochs))
    return net


def accuracy_on(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on (x, y) (:func:`fedlatent.train.evaluate`)."""
    return evaluate(net, x, y, batch_size)["accuracy"]


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, arch: str, data: ImageData, epochs: int = 300,
                       lr: float = 0.01, seeds=(0, 1, 2), batch_size: int = 256, dsa: bool = True,
                       progress: bool = True, max_test: int | None = None) -> dict:
    """Test accuracy (fraction) of fresh ``arch`` networks trained on the synthetic set only."""
    from tqdm import tqdm

    if epochs < 1:
        raise FedLatentError(f"evaluation epochs must be >= 1, got {epochs}")
    if not np.isfinite(lr) or lr <= 0:
        raise FedLatentError(f"evaluation lr must be a positive number, got {lr}")
    xt, yt = data.x_test, data.y_test
    if max_test is not None:
        xt, yt = xt[:max_test], yt[:max_test]
    accs = []
    for s in tqdm(list(seeds), desc=f"evaluate {arch}", disable=not progress, leave=False):
        net = train_on(images, labels, arch, data, epochs, lr, seed=int(s), batch_size=batch_size, dsa=dsa)
        accs.append(accuracy_on(net, xt, yt))
    return {"arch": arch, "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs,
            "epochs": epochs, "lr": lr}


@dataclass
class PixelResult:
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    history: list[float]
    evaluation: dict | None = None
    initial_evaluation: dict | None = None
    extra: dict = field(default_factory=dict)


def distill_pixels(data: ImageData, trajectories: list[torch.Tensor], arch: str, ipc: int, iterations: int,
                   config: DistillConfig, init: str = "real", eval_epochs: int = 0, eval_seeds=(0,),
                   eval_init: bool = False, progress: bool = True, max_test: int | None = None) -> PixelResult:
    """Run pixel MTT and (``eval_epochs > 0``) evaluate the result (and optionally the initial set)."""
    images, labels = init_synthetic(data, ipc, init, config.seed)
    model = get_model(arch, data.channels, data.num_classes, data.image_size)
    n = sum(p.numel() for p in model.parameters())
    if trajectories[0].shape[-1] != n:
        raise FedLatentError(f"expert trajectories have {trajectories[0].shape[-1]} parameters but {arch} on "
                             f"{data.channels}x{data.image_size}px/{data.num_classes} classes has {n}")
    sampler = TrajectorySampler(trajectories, config.expert_epochs, config.max_start_epoch, seed=config.seed)
    initial = None
    if eval_epochs > 0 and eval_init:
        initial = evaluate_synthetic(images, labels, arch, data, eval_epochs, config.lr_teacher, eval_seeds,
                                     progress=progress, max_test=max_test)
    syn = PixelSet(images)
    dist = Distiller(model, syn, labels, sampler, config)
    dist.run(iterations, progress=progress)
    out = syn.images.detach().clone()
    ev = None
    if eval_epochs > 0:
        ev = evaluate_synthetic(out, labels, arch, data, eval_epochs, dist.lr, eval_seeds, progress=progress,
                                max_test=max_test)
    return PixelResult(out, labels, dist.lr, [h.loss for h in dist.history], ev, initial,
                       {"kernel": dist.kernel_name})


def subset_per_class(data: ImageData, limit: int, seed: int) -> ImageData:
    """At most ``limit`` training images per class, drawn from the stream (seed, "train-limit"), in index order."""
    from dataclasses import replace

    if limit < 1:
        raise FedLatentError(f"--train-limit must be >= 1, got {limit}")
    rng = numpy_rng(seed, "train-limit")
    y = data.y_train.numpy()
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:limit] for c in range(data.num_classes)])
    keep = torch.from_numpy(np.sort(keep))
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def run_pixel_mtt(out_dir, *, dataset: str = "digits", data_root=None, arch: str = "convnet", ipc: int = 1,
                  iterations: int = 100, config: DistillConfig | None = None, num_experts: int = 2,
                  expert_train_epochs: int | None = None, experts_path=None, zca: bool = False, init: str = "real",
                  train_limit: int | None = None, eval_epochs: int = 100, eval_seeds: int = 2,
                  progress: bool = True) -> dict:
    """Pixel MTT end to end into ``out_dir``; the Python API behind ``fedlatent distill-pixels``.

    Loads ``dataset`` (at most ``train_limit`` training images per class: :func:`subset_per_class`), fits ZCA on
    the training images when ``zca`` (saved as ``zca.safetensors``), loads the expert trajectories of
    ``experts_path`` or trains ``num_experts`` (``expert_train_epochs``, default ``max_start_epoch +
    expert_epochs``, lr ``lr_teacher``; cached as ``experts.safetensors``), runs :func:`distill_pixels` with
    ``config`` and writes ``distilled.safetensors`` (the distilled-set format: images in the model's input
    space - ZCA-whitened when ``zca`` - hard labels, the learned lr and the loss history; ``extra`` records
    the method, architecture and ZCA), ``grid.png`` and ``metrics.json``. Returns the metrics dict.
    """
    import json
    import time
    from dataclasses import asdict, replace
    from pathlib import Path

    from torchvision.utils import make_grid, save_image

    from ..data import load_dataset
    from ..export import save_distilled
    from ..utils import atomic_write, atomic_write_text
    from .augment import ZCA
    from .experts import load_experts, save_experts, train_experts

    cfg = config or DistillConfig()
    seed = cfg.seed
    out = Path(out_dir)
    t0 = time.time()
    data = load_dataset(dataset, root=data_root)
    if train_limit is not None:
        data = subset_per_class(data, train_limit, seed)
    zca_t = None
    if zca:
        zca_t = ZCA().fit(data.x_train)
        data = replace(data, x_train=zca_t(data.x_train), x_test=zca_t(data.x_test))
        zca_t.save(out / "zca.safetensors")
    if experts_path:
        trajectories, meta = load_experts(experts_path)
        if meta.get("zca", zca) != zca:
            raise FedLatentError(f"{experts_path} was trained with zca={meta.get('zca')}, but --zca is {zca}")
    else:
        epochs = expert_train_epochs or (cfg.max_start_epoch + cfg.expert_epochs)
        trajectories = train_experts(arch, data, num_experts, epochs, lr=cfg.lr_teacher,
                                     seed=derive_seed(seed, "experts"), progress=progress)
        save_experts(out / "experts.safetensors", trajectories,
                     {"arch": arch, "dataset": dataset, "zca": zca, "epochs": epochs, "lr": cfg.lr_teacher})
    res = distill_pixels(data, trajectories, arch, ipc, iterations, cfg, init=init, eval_epochs=eval_epochs,
                         eval_seeds=tuple(range(eval_seeds)), progress=progress)
    save_distilled(out / "distilled.safetensors", res.images, res.labels, dataset=dataset,
                   class_names=list(data.classes), mean=data.mean, std=data.std, ipc=ipc, seed=seed,
                   extra={"method": "mtt", "arch": arch, "zca": bool(zca)}, lr=res.lr, loss_history=res.history)
    view = zca_t.inverse(res.images) if zca_t is not None else res.images
    view = data.denormalize(view)
    grid = make_grid(view, nrow=max(ipc, 1) if ipc <= 20 else 20, padding=1)
    atomic_write(out / "grid.png", lambda p: save_image(grid, p, format="png"))
    metrics = {"dataset": dataset, "arch": arch, "ipc": ipc, "n_images": len(res.images), "iterations": iterations,
               "config": asdict(cfg),
               "kernel": res.extra.get("kernel"), "learned_lr": res.lr, "loss_history": res.history,
               "evaluation": res.evaluation, "num_experts": len(trajectories), "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


__all__ = ["init_synthetic", "evaluate_synthetic", "train_on", "accuracy_on", "distill_pixels", "PixelResult",
           "subset_per_class", "run_pixel_mtt"]
