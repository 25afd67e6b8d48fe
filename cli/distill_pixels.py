"""``fedlatent distill-pixels``: pixel-space MTT (train or load experts, distil, evaluate, save)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import click


@click.command("distill-pixels")
@click.option("--dataset", default="digits", show_default=True, help="Dataset name (or npz:/folder).")
@click.option("--data-root", default=None, help="Folder holding the dataset files (else $FEDLATENT_DATA).")
@click.option("--ipc", type=int, default=1, show_default=True, help="Synthetic images per class.")
@click.option("--syn-steps", type=int, default=20, show_default=True, help="Student steps per iteration (N).")
@click.option("--expert-epochs", type=int, default=2, show_default=True, help="Expert epochs to match (M).")
@click.option("--max-start-epoch", type=int, default=10, show_default=True)
@click.option("--iterations", type=int, default=100, show_default=True, help="Distillation iterations.")
@click.option("--num-experts", type=int, default=2, show_default=True, help="Experts to train (ignored with --experts).")
@click.option("--expert-train-epochs", type=int, default=None,
              help="Epochs per expert [default: max-start-epoch + expert-epochs].")
@click.option("--experts", "experts_path", default=None, type=click.Path(dir_okay=False),
              help="Load expert trajectories (safetensors from an earlier run) instead of training them.")
@click.option("--arch", default="convnet", show_default=True, help="Student/expert architecture (e.g. convnet:width=64).")
@click.option("--mode", type=click.Choice(["exact", "unrolled"]), default="exact", show_default=True,
              help="exact: constant memory; unrolled: keeps every step (faster, memory grows with syn-steps).")
@click.option("--engine", type=click.Choice(["auto", "convnet", "autograd"]), default="auto", show_default=True)
@click.option("--zca/--no-zca", default=False, show_default=True, help="ZCA-whiten real and synthetic images.")
@click.option("--init", "init", type=click.Choice(["real", "noise"]), default="real", show_default=True)
@click.option("--batch-syn", type=int, default=None, help="Synthetic minibatch per step [default: all].")
@click.option("--lr-img", type=float, default=1000.0, show_default=True)
@click.option("--lr-lr", type=float, default=0.1, show_default=True, help="SGD step on log(lr).")
@click.option("--lr-teacher", type=float, default=0.01, show_default=True, help="Initial student lr (and experts' lr).")
@click.option("--dsa/--no-dsa", default=True, show_default=True, help="Differentiable siamese augmentation.")
@click.option("--train-limit", type=int, default=None, help="Use at most this many training images per class.")
@click.option("--eval-epochs", type=int, default=100, show_default=True, help="0 skips the evaluation.")
@click.option("--eval-seeds", type=int, default=2, show_default=True, help="Networks trained in the evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def distill_pixels(dataset, data_root, ipc, syn_steps, expert_epochs, max_start_epoch, iterations, num_experts,
                   expert_train_epochs, experts_path, arch, mode, engine, zca, init, batch_syn, lr_img, lr_lr,
                   lr_teacher, dsa, train_limit, eval_epochs, eval_seeds, seed, out_dir, quiet) -> None:
    """Distil a dataset into IPC images per class by matching expert training trajectories (MTT).

    Writes OUT/distilled.safetensors (images in the model's input space, labels, learned lr),
    OUT/grid.png, OUT/metrics.json and (when trained here) OUT/experts.safetensors.
    """
    import numpy as np
    import torch
    from torchvision.utils import save_image, make_grid

    from fedlatent.data import load_dataset
    from fedlatent.distill import ZCA, DistillConfig, distill_pixels as run, load_experts, save_experts, train_experts
    from fedlatent.distill.mtt import tune_allocator
    from fedlatent.utils import (FedLatentError, atomic_write, atomic_write_text, derive_seed, numpy_rng,
                                 save_safetensors)

    tune_allocator()
    out = Path(out_dir)
    progress = not quiet
    t0 = time.time()
    data = load_dataset(dataset, root=data_root)
    if train_limit is not None:
        if train_limit < 1:
            raise FedLatentError(f"--train-limit must be >= 1, got {train_limit}")
        rng = numpy_rng(seed, "train-limit")
        y = data.y_train.numpy()
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:train_limit] for c in range(data.num_classes)])
        keep = torch.from_numpy(np.sort(keep))
        data = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
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
        epochs = expert_train_epochs or (max_start_epoch + expert_epochs)
        trajectories = train_experts(arch, data, num_experts, epochs, lr=lr_teacher,
                                     seed=derive_seed(seed, "experts"), progress=progress)
        save_experts(out / "experts.safetensors", trajectories,
                     {"arch": arch, "dataset": dataset, "zca": zca, "epochs": epochs, "lr": lr_teacher})
    cfg = DistillConfig(syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=max_start_epoch,
                        batch_syn=batch_syn, lr_img=lr_img, lr_lr=lr_lr, lr_teacher=lr_teacher, mode=mode,
                        engine=engine, dsa=dsa, seed=seed)
    res = run(data, trajectories, arch, ipc, iterations, cfg, init=init, eval_epochs=eval_epochs,
              eval_seeds=tuple(range(eval_seeds)), progress=progress)
    tensors = {"images": res.images.contiguous(), "labels": res.labels.contiguous(),
               "lr": torch.tensor([res.lr], dtype=torch.float64)}
    save_safetensors(out / "distilled.safetensors", tensors, {"dataset": dataset, "arch": arch, "zca": str(zca),
                                                              "mean": json.dumps(data.mean), "std": json.dumps(data.std)})
    view = zca_t.inverse(res.images) if zca_t is not None else res.images
    view = data.denormalize(view)
    grid = make_grid(view, nrow=max(ipc, 1) if ipc <= 20 else 20, padding=1)
    atomic_write(out / "grid.png", lambda p: save_image(grid, p, format="png"))
    metrics = {"dataset": dataset, "arch": arch, "ipc": ipc, "iterations": iterations, "config": asdict(cfg),
               "kernel": res.extra.get("kernel"), "learned_lr": res.lr, "loss_history": res.history,
               "evaluation": res.evaluation, "num_experts": len(trajectories), "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    last = np.mean(res.history[-10:]) if res.history else float("nan")
    msg = f"distilled {len(res.images)} images; mean loss of the last 10 iterations {last:.4f}; lr {res.lr:.3g}"
    if res.evaluation:
        e = res.evaluation
        msg += f"; test accuracy {100 * e['mean']:.2f} +- {100 * e['std']:.2f} % ({arch}, {len(e['accs'])} runs)"
    click.echo(msg)
    from fedlatent.summary import echo_summary

    echo_summary([], title="distill-pixels summary", wall_s=time.time() - t0, out_dir=out,
                 files=["distilled.safetensors", "grid.png", "metrics.json"],
                 info={"images": len(res.images), "final loss (mean of last 10)": f"{last:.4f}",
                       **({"test accuracy": f"{e['mean']:.4f} +- {e['std']:.4f} ({len(e['accs'])} runs)"}
                          if res.evaluation else {})})


COMMANDS = [distill_pixels]
