"""Does pixel MTT help? Accuracy of networks trained on the distilled set vs on its initialisation.

Trains experts on the real data, distils ``ipc`` images per class (initialised from random real
images), and evaluates fresh networks trained only on (a) the initial real images and (b) the
distilled images (same evaluation protocol and seeds). Prints a table and writes JSON.

    python benchmarks/distill_pixels.py --dataset digits --ipc 1 --iterations 200
    python benchmarks/distill_pixels.py --dataset cifar10 --data-root ../shared/data --ipc 10 \
        --train-limit 500 --arch convnet:width=64 --iterations 300 --zca

Small CPU defaults; the paper-scale setting (CIFAR-10, ipc 10, 5000 iterations, 100 experts of 50
epochs, eval 1000 epochs x 5) needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--resize", type=int, default=None)
    p.add_argument("--arch", default="convnet:width=32")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--max-start-epoch", type=int, default=5)
    p.add_argument("--num-experts", type=int, default=3)
    p.add_argument("--lr-img", type=float, default=100.0)
    p.add_argument("--lr-lr", type=float, default=0.1)
    p.add_argument("--lr-teacher", type=float, default=0.01)
    p.add_argument("--mode", default="exact", choices=["exact", "unrolled"])
    p.add_argument("--train-limit", type=int, default=None, help="training images per class")
    p.add_argument("--zca", action="store_true")
    p.add_argument("--eval-epochs", type=int, default=200)
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/distill_pixels.json")
    a = p.parse_args()

    from fedlatent.data import load_dataset
    from fedlatent.distill import ZCA, DistillConfig, distill_pixels, evaluate_synthetic, init_synthetic, train_experts
    from fedlatent.distill.mtt import tune_allocator
    from fedlatent.utils import derive_seed, numpy_rng

    torch.set_num_threads(a.threads)
    tune_allocator()
    t0 = time.time()
    data = load_dataset(a.dataset, root=a.data_root, resize=a.resize)
    if a.train_limit:
        rng = numpy_rng(a.seed, "train-limit")
        y = data.y_train.numpy()
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[: a.train_limit]
                                       for c in range(data.num_classes)]))
        data = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    if a.zca:
        z = ZCA().fit(data.x_train)
        data = replace(data, x_train=z(data.x_train), x_test=z(data.x_test))
    epochs = a.max_start_epoch + a.expert_epochs
    trajs = train_experts(a.arch, data, a.num_experts, epochs, lr=a.lr_teacher, seed=derive_seed(a.seed, "experts"))
    t_exp = time.time() - t0
    cfg = DistillConfig(syn_steps=a.syn_steps, expert_epochs=a.expert_epochs, max_start_epoch=a.max_start_epoch,
                        lr_img=a.lr_img, lr_lr=a.lr_lr, lr_teacher=a.lr_teacher, mode=a.mode, seed=a.seed)
    seeds = tuple(range(a.eval_seeds))
    init_imgs, labels = init_synthetic(data, a.ipc, "real", a.seed)
    base = evaluate_synthetic(init_imgs, labels, a.arch, data, a.eval_epochs, a.lr_teacher, seeds)
    t1 = time.time()
    res = distill_pixels(data, trajs, a.arch, a.ipc, a.iterations, cfg, init="real", eval_epochs=a.eval_epochs,
                         eval_seeds=seeds)
    t_dist = time.time() - t1
    rows = [("real init (no distillation)", base), ("MTT distilled", res.evaluation)]
    print(f"\n{a.dataset}, {a.arch}, ipc {a.ipc}, {a.iterations} iterations, syn_steps {a.syn_steps}, "
          f"{a.num_experts} experts x {epochs} epochs, train/class {a.train_limit or 'all'}, zca {a.zca}")
    print(f"{'synthetic set':30s} {'test acc %':>12s}")
    for name, ev in rows:
        print(f"{name:30s} {100 * ev['mean']:6.2f} +- {100 * ev['std']:4.2f}")
    print(f"learned lr {res.lr:.4g}; loss first/last 10: {np.mean(res.history[:10]):.4f} / "
          f"{np.mean(res.history[-10:]):.4f}; experts {t_exp:.0f}s, distillation+eval {t_dist:.0f}s")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "config": asdict(cfg), "baseline": base, "distilled": res.evaluation,
                   "learned_lr": res.lr, "loss_history": res.history, "seconds_experts": t_exp,
                   "seconds_distill_eval": t_dist}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
