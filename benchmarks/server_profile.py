"""Where FedDGM's server time goes: one latent-MTT iteration split into its phases, and server pool training.

Builds the FedDGM server of the default CIFAR-10 cell of ``benchmarks/feddgm.py`` (10 clients, ConvNet-D3
width 32 surrogate, built-in generator, CPU preset: ipc 2, 8 syn_steps, DSA) on synthetic client uploads and times

* render forward (``synthetic.render``),
* student unroll (the N forward+gradient steps of MTT eq. 1),
* adjoint backward (recompute + R-operator per step, augmentation backward),
* render backward (``synthetic.backward``: back through the generator to the latents; a one-chunk set keeps
  its render graph, so this is the backward pass alone and the forward builds the graph),
* optimiser step,

for the looped path (client after client) and the batched (grouped) path, interleaved, repeated; then one
server-training epoch block on a pool of the same size. Prints a table (medians), writes JSON.

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/server_profile.py --repeats 5 --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import server_on_uploads  # noqa: E402


class Timer:
    def __init__(self):
        self.acc = defaultdict(float)

    def wrap(self, name, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[name] += time.perf_counter() - t
        return inner


def build(a):
    from fedlatent.data import load_dataset
    from fedlatent.fl.base import FLConfig
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.generators.resolve import default_generator

    data = load_dataset("cifar10", root=a.data_root)
    gen = default_generator(data.name)
    cfg = FLConfig(clients=a.clients, model=a.model, seed=0, device="cpu").check()
    s = FedDGM(generator=gen, surrogate=a.model, progress=False, save_artifacts=False, ipc=a.ipc,
               syn_steps=a.syn_steps, lr_img=100.0, dsa_strategy="color_crop_cutout_scale_rotate",
               mtt_engine=a.engine, mtt_mode=a.mode, render_engine=a.render_engine, train_engine=a.train_engine)
    ups = server_on_uploads(s, data, cfg)
    return s, ups, gen


def profile_looped(s, ups, timer: Timer):
    from fedlatent.distill import mtt as M

    ds = s.make_distillers(1, ups)
    kernel_cls = type(M.make_kernel(ds[0].flat))
    orig_fwd, orig_rop = kernel_cls.forward, kernel_cls.rop

    def fwd(self, theta, x, labels, keep, **kw):
        t = time.perf_counter()
        try:
            return orig_fwd(self, theta, x, labels, keep, **kw)
        finally:
            timer.acc["student unroll" if not keep else "adjoint backward"] += time.perf_counter() - t

    orig_rr = kernel_cls.recompute_rop
    kernel_cls.forward, kernel_cls.rop = fwd, timer.wrap("adjoint backward", orig_rop)
    if kernel_cls is not M.AutogradKernel:  # the autograd kernel's recompute_rop calls forward and rop, timed above
        kernel_cls.recompute_rop = timer.wrap("adjoint backward", orig_rr)
    try:
        for d in ds:  # warm-up iteration
            d.step()
        timer.acc.clear()
        t0 = time.perf_counter()
        for d in ds:
            syn = d.synthetic
            r0, b0 = syn.render, syn.backward
            syn.render, syn.backward = timer.wrap("render forward", r0), timer.wrap("render backward", b0)
            t = time.perf_counter()
            d.step()
            timer.acc["mtt total"] += time.perf_counter() - t
            syn.render, syn.backward = r0, b0
        total = time.perf_counter() - t0
    finally:
        kernel_cls.forward, kernel_cls.rop, kernel_cls.recompute_rop = orig_fwd, orig_rop, orig_rr
    return total


def profile_batched(s, ups, timer: Timer):
    from fedlatent.distill.batched import batched_step

    ds = s.make_distillers(1, ups)
    batched_step(ds)  # warm-up
    timer.acc.clear()
    for d in ds:
        syn = d.synthetic
        syn.render, syn.backward = timer.wrap("render forward", syn.render), timer.wrap("render backward", syn.backward)
    t0 = time.perf_counter()
    batched_step(ds)
    return time.perf_counter() - t0


def profile_train(s, epochs: int):
    from fedlatent.distill.augment import DSA
    from fedlatent.train import fit_on_set

    n = s.ipc * s.ctx.num_classes * s.ctx.config.clients
    x = torch.randn(n, s.ctx.channels, s.ctx.image_size, s.ctx.image_size)
    y = torch.arange(s.ctx.num_classes).repeat(n // s.ctx.num_classes)
    aug = DSA(s.dsa_strategy, siamese=False)
    opt = torch.optim.SGD(s.model.parameters(), lr=s.train_lr, momentum=s.train_momentum,
                          weight_decay=s.train_weight_decay)
    kw = dict(batch_size=s.train_batch, augment=aug, generator=torch.Generator().manual_seed(0), engine=s.train_engine)
    fit_on_set(s.model, x, y, opt, epochs=1, **kw)  # warm-up (a compiled engine compiles here)
    t = time.perf_counter()
    fit_on_set(s.model, x, y, opt, epochs=epochs, **kw)
    return (time.perf_counter() - t) / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("FEDLATENT_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--model", default="convnet-d3:width=32")
    p.add_argument("--ipc", type=int, default=2)
    p.add_argument("--syn-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-epochs", type=int, default=10, help="server epochs timed per repeat")
    p.add_argument("--paths", default="looped,batched", help="which client paths to time [%(default)s]")
    p.add_argument("--engine", default="auto", help="FedDGM's mtt_engine [%(default)s; the cifar10-cpu preset: fast]")
    p.add_argument("--mode", default="exact", help="FedDGM's mtt_mode [%(default)s]")
    p.add_argument("--render-engine", default="eager", help="FedDGM's render_engine [%(default)s; the preset: fast]")
    p.add_argument("--train-engine", default="autograd", help="FedDGM's train_engine [%(default)s; the preset: fast]")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server_profile.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fedlatent.distill.mtt import tune_allocator

    tune_allocator()
    s, ups, gen = build(a)
    runs = defaultdict(list)
    for _ in range(a.repeats):  # interleaved: looped, batched, training
        for path in a.paths.split(","):
            t = Timer()
            tot = (profile_looped if path == "looped" else profile_batched)(s, ups, t)
            runs[f"{path} total"].append(tot)
            for k, v in t.acc.items():
                runs[f"{path} {k}"].append(v)
            print(f"{path}: {tot:.2f} s", file=sys.stderr, flush=True)
        runs["server train s/epoch"].append(profile_train(s, a.train_epochs))
    med = {k: statistics.median(v) for k, v in runs.items()}
    load = os.getloadavg()
    print(f"FedDGM server, cifar10, {a.clients} clients, {a.model}, ipc {a.ipc}, {a.syn_steps} syn_steps, "
          f"generator {gen}; {a.threads} threads; medians of {a.repeats}; load average {load[0]:.1f}")
    lt = med.get("looped total", float("nan"))
    for path in a.paths.split(","):
        print(f"\n{path}: one MTT iteration of all {a.clients} clients = {med[f'{path} total']:.3f} s")
        for k in ("render forward", "student unroll", "adjoint backward", "render backward"):
            key = f"{path} {k}"
            if key in med:
                print(f"  {k:18s} {med[key]:8.3f} s  {100 * med[key] / med[f'{path} total']:5.1f} %")
        if path == "looped":
            rest = lt - sum(med.get(f"looped {k}", 0) for k in ("render forward", "student unroll",
                                                                  "adjoint backward", "render backward"))
            print(f"  {'rest (DSA, optim)':18s} {rest:8.3f} s  {100 * rest / lt:5.1f} %")
    if "batched total" in med and "looped total" in med:
        print(f"\nbatched / looped time: {med['batched total'] / med['looped total']:.2f}")
    print(f"server training: {med['server train s/epoch']:.4f} s per epoch on the {a.ipc * 10 * a.clients}-image pool")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "load": load, "runs": runs, "median": med}, f, indent=2)


if __name__ == "__main__":
    main()
