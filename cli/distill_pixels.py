"""``fedlatent distill-pixels``: pixel-space MTT (train or load experts, distil, evaluate, save)."""
from __future__ import annotations

import click

from fedlatent.cli._options import data_options, progress_option


@click.command("distill-pixels")
@data_options(image_size=False)
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
@progress_option
def distill_pixels(dataset, data_root, ipc, syn_steps, expert_epochs, max_start_epoch, iterations, num_experts,
                   expert_train_epochs, experts_path, arch, mode, engine, zca, init, batch_syn, lr_img, lr_lr,
                   lr_teacher, dsa, train_limit, eval_epochs, eval_seeds, seed, out_dir, no_progress) -> None:
    """Distil a dataset into IPC images per class by matching expert training trajectories (MTT).

    Writes OUT/distilled.safetensors (the distilled-set format: images in the model's input space, labels,
    learned lr; `fedlatent eval` reads it), OUT/grid.png, OUT/metrics.json and (when trained here)
    OUT/experts.safetensors.
    """
    import numpy as np

    from fedlatent.distill import DistillConfig
    from fedlatent.distill.mtt import tune_allocator
    from fedlatent.distill.pixels import run_pixel_mtt

    tune_allocator()
    cfg = DistillConfig(syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=max_start_epoch,
                        batch_syn=batch_syn, lr_img=lr_img, lr_lr=lr_lr, lr_teacher=lr_teacher, mode=mode,
                        engine=engine, dsa=dsa, seed=seed)
    m = run_pixel_mtt(out_dir, dataset=dataset, data_root=data_root, arch=arch, ipc=ipc, iterations=iterations,
                      config=cfg, num_experts=num_experts, expert_train_epochs=expert_train_epochs,
                      experts_path=experts_path, zca=zca, init=init, train_limit=train_limit, eval_epochs=eval_epochs,
                      eval_seeds=eval_seeds, progress=not no_progress)
    hist = m["loss_history"]
    last = np.mean(hist[-10:]) if hist else float("nan")
    msg = f"mean loss of the last 10 iterations {last:.4f}; lr {m['learned_lr']:.3g}"
    if m["evaluation"]:
        e = m["evaluation"]
        msg += f"; test accuracy {100 * e['mean']:.2f} +- {100 * e['std']:.2f} % ({arch}, {len(e['accs'])} runs)"
    click.echo(f"distilled {m['n_images']} images; " + msg)
    click.echo(f"wrote {out_dir}/distilled.safetensors, grid.png, metrics.json")
    from fedlatent.summary import echo_summary

    e = m["evaluation"]
    echo_summary([], title="distill-pixels summary", wall_s=m.get("seconds"), out_dir=out_dir,
                 files=["distilled.safetensors", "grid.png", "metrics.json"],
                 info={"images": m["n_images"], "final loss (mean of last 10)": f"{last:.4f}",
                       **({"test accuracy": f"{e['mean']:.4f} +- {e['std']:.4f} ({len(e['accs'])} runs)"} if e else {})})


COMMANDS = [distill_pixels]
