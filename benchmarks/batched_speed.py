"""Batched vs looped multi-client MTT meta-gradients on one device, interleaved, same problems.

K clients, each its own student parameters, synthetic images, plan and per-image DSA (the FedDGM server's
shape: ConvNet-D3 width 32 surrogate, 32 px, ipc 2 x 10 classes, 8 syn_steps by default). Per repeat, in turn:

* ``loop``: :func:`fedlatent.distill.mtt.meta_gradient` client after client (the looped engine);
* ``grouped``: :func:`fedlatent.distill.batched.batched_meta_gradient` (the K students as one grouped ConvNet);
* ``vmap`` (``--vmap``): the previous batched implementation, ``torch.func.vmap`` over the clients;
* ``loop:ENGINE`` (``--engines``): the loop with another MTT engine, e.g. ``convnet-bf16-compiled`` (what
  ``engine="fast"`` picks on an AVX-512-BF16 CPU; its first call compiles, outside the timed repeats).

Prints medians (and the machine's load average: timings on a shared machine are noisy), the largest
difference between the paths' gradients, writes JSON.

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/batched_speed.py --clients 10 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--model", default="convnet-d3:width=32")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=20, help="synthetic images per client (ipc x classes)")
    p.add_argument("--syn-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vmap", action="store_true", help="also time the vmap implementation")
    p.add_argument("--engines", default="", help="comma-separated MTT engines also timed in the loop")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batched_speed.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fedlatent.distill import batched as B
    from fedlatent.distill.augment import DSA
    from fedlatent.distill.mtt import make_plan, meta_gradient, tune_allocator
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    tune_allocator()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    model = get_model(a.model, 3, 10, a.size).to(dev)
    flat = FlatModel(model)
    K = a.clients
    th0 = flat.flatten()
    starts = torch.stack([th0 + 0.01 * torch.randn(th0.shape, generator=g).to(dev) for _ in range(K)])
    ends = starts + 0.01 * torch.randn(starts.shape, generator=g).to(dev)
    imgs = torch.randn(K, a.images, 3, a.size, a.size, generator=g).to(dev)
    labels = (torch.arange(a.images) % 10).repeat(K, 1).to(dev)
    log_lr = torch.full((K,), math.log(0.01), device=dev)
    aug = DSA(siamese=False)  # per-image draws, as the reference
    plans = [make_plan(a.images, a.syn_steps, a.images, seed=k) for k in range(K)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def loop(engine="auto"):
        return [meta_gradient(flat, starts[k], ends[k], imgs[k], labels[k], log_lr[k], plans[k], aug, mode="exact",
                              engine=engine) for k in range(K)]

    def grouped():
        return B.batched_meta_gradient(flat, starts, ends, imgs, labels, log_lr, plans, aug)

    def vmapped():
        orig = B.ConvNetKernel.supports
        B.ConvNetKernel.supports = staticmethod(lambda m: False)  # force the vmap fallback
        try:
            return B.batched_meta_gradient(flat, starts, ends, imgs, labels, log_lr, plans, aug)
        finally:
            B.ConvNetKernel.supports = orig

    paths = {"loop": loop, "grouped": grouped} | ({"vmap": vmapped} if a.vmap else {})
    paths |= {f"loop:{e}": (lambda e=e: loop(e)) for e in filter(None, a.engines.split(","))}
    results, warm = {}, {}
    for k, fn in paths.items():  # warm-up (compiles a compiled engine), and the results to compare
        t = time.perf_counter()
        results[k] = fn()
        warm[k] = time.perf_counter() - t
    diff = {k: max(float((r.grad_images - l.grad_images).abs().max() / l.grad_images.abs().max())
                   for r, l in zip(results[k], results["loop"])) for k in paths if k != "loop"}
    times = {k: [] for k in paths}
    cpu = {k: [] for k in paths}  # process CPU time: less sensitive to other jobs on a shared machine
    loads = []
    for _ in range(a.repeats):
        for k, fn in paths.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
        loads.append(os.getloadavg()[0])
        print("  " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{K} clients, {a.model}, {a.size} px, {a.images} images, {a.syn_steps} syn_steps, per-image DSA, "
          f"{a.threads} threads, {a.device}; medians of {a.repeats} interleaved repeats; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    w = max(8, *map(len, paths))
    print(f"{'path':{w}s} {'wall s / iteration':>18s} {'wall / loop':>11s} {'CPU s / iteration':>17s} {'CPU / loop':>10s} "
          f"{'max rel diff of dX':>19s} {'warm-up wall s':>14s}")
    for k in paths:
        print(f"{k:{w}s} {med[k]:18.3f} {med[k] / med['loop']:11.2f} {med_cpu[k]:17.3f} {med_cpu[k] / med_cpu['loop']:10.2f} "
              f"{diff.get(k, 0.0):19.1e} {warm[k]:14.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "times": times, "median": med, "cpu": cpu, "median_cpu": med_cpu, "max_rel_diff": diff,
                   "warm_up_wall_s": warm, "load": loads, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
