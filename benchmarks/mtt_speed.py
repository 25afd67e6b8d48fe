"""Speed and peak memory of one MTT iteration (CPU), with the analytic FLOP count and floor.

Setting of the MTT CIFAR-10 ipc-10 experiment: ConvNet-D3 (width 128, instance norm, avg-pool),
32 px, 3 channels, 10 classes, 100 synthetic images, batch_syn 100 (the whole set every step), DSA.
Every (mode, syn_steps) runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own.

    python benchmarks/mtt_speed.py --steps 10,20,40,60 --modes unrolled,exact --iters 3 --threads 2

FLOPs: a 3x3 convolution layer costs ``F = 2 * B * H * W * Cin * Cout * 9`` per pass; forward,
input-gradient and weight-gradient each cost one F. Per student step (layer 1 has no input
gradient in the forward pass, its input being data):

* reference (create_graph everywhere, then backward): layer 1: 6F, other layers: 9F;
* ours, unrolled: forward pass (loss + g): 2F / 3F; R-operator: tangent forward 1F / 2F, tangent
  weight gradient 1F / 2F (skipped at step 0), input tangent 2F / 2F -> 6F / 9F, less at step 0;
* ours, exact: the unrolled count plus the recomputed forward and input gradients: +1F / +2F.

The floor is FLOPs / (measured conv throughput of this machine at these threads).

Side by side with the reference (``--reference DIR``, a checkout of GeorgeCazenavette/mtt-distillation, used
unmodified): its ConvNet, ``ReparamModule`` and ``DiffAugment`` (per-image draws) run the inner loop of its
``distill.py`` -- ``syn_steps`` student steps with ``create_graph=True``, the normalised parameter-matching loss,
one backward -- on the same random CIFAR-shaped problem, in its own subprocess, interleaved with the engines
(reference first in every pass). Speed-ups are against the reference row of the same pass, on CPU time and on
wall time; without ``--reference`` there is no reference column (no number from another run is used).

    python benchmarks/mtt_speed.py --steps 20 --modes exact --engines convnet,convnet-bf16-compiled \
        --threads 1 --per-image-dsa --passes 2 --iters 2 --reference PATH/TO/mtt-distillation
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

B, C_IN, SIZE, WIDTH, DEPTH, CLASSES = 100, 3, 32, 128, 3, 10


def conv_flops() -> list[float]:
    out, s, c = [], SIZE, C_IN
    for _ in range(DEPTH):
        out.append(2.0 * B * s * s * c * WIDTH * 9)
        c, s = WIDTH, s // 2
    return out


def iteration_flops(mode: str, steps: int) -> dict[str, float]:
    F = conv_flops()
    ref = steps * (6 * F[0] + 9 * sum(F[1:]))
    ours = steps * (6 * F[0] + 9 * sum(F[1:])) - (F[0] + 2 * sum(F[1:]))  # no weight tangent at step 0
    if mode == "exact":
        ours += steps * (F[0] + 2 * sum(F[1:]))
    return {"reference": ref, "ours": ours}


def measure_conv_rate(threads: int) -> float:
    """FLOP/s of this machine on the dominant convolution (layer 2 forward, channels-last)."""
    import torch
    import torch.nn.functional as Fn

    torch.set_num_threads(threads)
    x = torch.randn(B, WIDTH, SIZE // 2, SIZE // 2).contiguous(memory_format=torch.channels_last)
    w = torch.randn(WIDTH, WIDTH, 3, 3)
    Fn.conv2d(x, w, padding=1)
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        Fn.conv2d(x, w, padding=1)
    dt = (time.perf_counter() - t) / reps
    return 2.0 * B * (SIZE // 2) ** 2 * WIDTH * WIDTH * 9 / dt


def measure_matmul_peak(threads: int, dtype: str = "float32", n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul (the machine's practical dense peak in ``dtype``; best of ``reps``)."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    x, y = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    x @ y
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def worker(a: argparse.Namespace) -> None:
    import torch

    from fedlatent.distill.augment import DSA
    from fedlatent.distill.mtt import make_plan, meta_gradient, tune_allocator
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    torch.set_num_threads(a.threads)
    tuned = tune_allocator() if a.tune_malloc else False
    g = torch.Generator().manual_seed(0)
    model = get_model(f"convnet-d3:width={WIDTH}", C_IN, CLASSES, SIZE)
    flat = FlatModel(model)
    start = flat.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    images = torch.randn(B, C_IN, SIZE, SIZE, generator=g)
    labels = torch.arange(B) % CLASSES
    dsa = DSA(siamese=not a.per_image_dsa)
    log_lr = torch.tensor(math.log(0.01))
    times, cpu = [], []
    for it in range(a.warmup + a.iters):
        plan = make_plan(B, a.syn_steps, B, seed=it)
        t, c = time.perf_counter(), time.process_time()
        meta_gradient(flat, start, target, images, labels, log_lr, plan, dsa, mode=a.mode, engine=a.engine)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"times": times[a.warmup:], "warmup_times": times[: a.warmup], "peak_bytes": peak,
                      "cpu_times": cpu[a.warmup:],
                      "tuned_malloc": tuned}))


def reference_worker(a: argparse.Namespace) -> None:
    """The reference's MTT iteration (its modules, imported from ``a.reference``), timed like :func:`worker`."""
    import importlib
    import types

    import torch

    for name in ("kornia", "torchvision"):  # imported at the top of its utils.py, unused by DiffAugment
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules[name] = types.SimpleNamespace(datasets=None, transforms=None)
    try:
        importlib.import_module("scipy.ndimage.interpolation")
    except Exception:
        sys.modules["scipy.ndimage.interpolation"] = types.SimpleNamespace(rotate=None)
    sys.path.insert(0, os.path.abspath(a.reference))
    from networks import ConvNet
    from reparam_module import ReparamModule
    from utils import DiffAugment, ParamDiffAug

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = ConvNet(channel=C_IN, num_classes=CLASSES, net_width=WIDTH, net_depth=DEPTH, net_act="relu",
                  net_norm="instancenorm", net_pooling="avgpooling", im_size=(SIZE, SIZE))
    start = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
    student = ReparamModule(net)
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(B, C_IN, SIZE, SIZE).requires_grad_(True)
    labels = torch.arange(CLASSES).repeat_interleave(B // CLASSES)  # ipc images per class, as its label_syn
    syn_lr = torch.tensor(0.01).requires_grad_(True)
    opt_img = torch.optim.SGD([images], lr=1000.0, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)
    dsa = ParamDiffAug()
    dist = torch.nn.functional.mse_loss(start, target, reduction="sum")
    times, cpu = [], []
    for _ in range(a.warmup + a.iters):
        t, c = time.perf_counter(), time.process_time()
        params = [start.clone().requires_grad_(True)]
        for _ in range(a.syn_steps):  # batch_syn = the whole set, as in this benchmark's setting
            idx = torch.randperm(B)
            x = DiffAugment(images[idx], "color_crop_cutout_flip_scale_rotate", param=dsa)
            ce = torch.nn.functional.cross_entropy(student(x, flat_param=params[-1]), labels[idx])
            g = torch.autograd.grad(ce, params[-1], create_graph=True)[0]
            params.append(params[-1] - syn_lr * g)
        loss = torch.nn.functional.mse_loss(params[-1], target, reduction="sum") / dist
        opt_img.zero_grad()
        opt_lr.zero_grad()
        loss.backward()
        opt_img.step()
        opt_lr.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times[a.warmup:], "warmup_times": times[: a.warmup], "peak_bytes": peak,
                      "cpu_times": cpu[a.warmup:], "tuned_malloc": False}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="10,20,40,60")
    p.add_argument("--modes", default="unrolled,exact")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per config")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", default="auto", choices=["auto", "convnet", "convnet-bf16", "convnet-compiled",
                                                            "convnet-bf16-compiled", "autograd", "reference"])
    p.add_argument("--engines", default=None, help="comma list of engines compared side by side (default: --engine)")
    p.add_argument("--passes", type=int, default=1, help="repeat the whole sweep (interleaved repeats)")
    p.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                   help="do not call fedlatent.distill.tune_allocator() (glibc keeps big blocks)")
    p.add_argument("--per-image-dsa", action="store_true", help="per-image DSA draws (the reference's choice)")
    p.add_argument("--reference", default=os.environ.get("FEDLATENT_MTT_REFERENCE"), metavar="DIR",
                   help="a checkout of mtt-distillation to time side by side [env FEDLATENT_MTT_REFERENCE]")
    p.add_argument("--out", default="benchmarks/results/mtt_speed.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="exact", help=argparse.SUPPRESS)
    p.add_argument("--syn-steps", type=int, default=10, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return reference_worker(a) if a.engine == "reference" else worker(a)
    if a.reference and not all(os.path.isfile(os.path.join(a.reference, f))
                               for f in ("networks.py", "reparam_module.py", "utils.py")):
        p.error(f"--reference {a.reference}: not a checkout of mtt-distillation (networks.py, reparam_module.py, "
                "utils.py)")

    rate = measure_conv_rate(a.threads)
    peak = {dt: measure_matmul_peak(a.threads, dt) for dt in ("float32", "bfloat16")}
    rows = []
    for pass_ in range(a.passes):  # interleaved: every engine of a config back to back, the sweep repeated
        for mi, mode in enumerate(a.modes.split(",")):
            for steps in [int(s) for s in a.steps.split(",")]:
                engines = (a.engines or a.engine).split(",")
                if a.reference and mi == 0:  # the reference has one mode: once per pass and syn_steps
                    engines = ["reference"] + engines
                for engine in engines:
                    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--syn-steps", str(steps), "--iters",
                           str(a.iters), "--warmup", str(a.warmup), "--threads", str(a.threads), "--engine", engine]
                    cmd += ["--reference", a.reference] if engine == "reference" else []
                    cmd += [] if a.tune_malloc else ["--no-tune-malloc"]
                    cmd += ["--per-image-dsa"] if a.per_image_dsa else []
                    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if r.returncode != 0:
                        print(f"{mode} {steps}: worker failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                        rows.append({"mode": mode, "syn_steps": steps, "engine": engine, "error": r.stderr[-500:]})
                        continue
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    times = sorted(res["times"])
                    sec = statistics.median(times)  # an even count: the mean of the middle two
                    fl = iteration_flops(mode, steps)
                    if engine == "reference":
                        fl = {**fl, "ours": fl["reference"]}
                    cpu = sorted(res["cpu_times"])
                    row = {"mode": "reference" if engine == "reference" else mode, "syn_steps": steps,
                           "engine": engine, "pass": pass_,
                           "load": os.getloadavg()[0], "sec_per_iter": sec, "min_sec": times[0], "times": res["times"],
                           "cpu_sec_per_iter": statistics.median(cpu),
                           "peak_gb": res["peak_bytes"] / 1e9, "gflop": fl["ours"] / 1e9, "ref_gflop": fl["reference"] / 1e9,
                           "floor_sec": fl["ours"] / rate, "achieved_gflops": fl["ours"] / sec / 1e9,
                           "tuned_malloc": res["tuned_malloc"]}
                    rows.append(row)
                    print(f"  done {engine} {mode} {steps}: {sec:.2f} s/iter, peak {row['peak_gb']:.2f} GB",
                          file=sys.stderr, flush=True)

    refs = {(r["pass"], r["syn_steps"]): r for r in rows if r["engine"] == "reference" and "error" not in r}
    for r in rows:  # against the reference row of the same pass and syn_steps
        ref = refs.get((r["pass"], r["syn_steps"]))
        if ref is not None and "error" not in r:
            r.update(ref_cpu_sec=ref["cpu_sec_per_iter"], ref_sec=ref["sec_per_iter"], ref_peak_gb=ref["peak_gb"],
                     speedup_vs_ref=ref["cpu_sec_per_iter"] / r["cpu_sec_per_iter"],
                     wall_speedup_vs_ref=ref["sec_per_iter"] / r["sec_per_iter"])
    print(f"\nconv throughput here ({a.threads} threads): {rate / 1e9:.0f} GFLOP/s; engine {a.engine}; "
          f"malloc tuned: {a.tune_malloc}")
    hdr = f"{'engine':22s} {'mode':9s} {'steps':>5s} {'s/iter':>8s} {'peak GB':>8s} {'GFLOP':>8s} {'floor s':>8s} " \
          f"{'GFLOP/s':>8s} {'cpu s':>7s} {'vs reference (CPU)':>18s} {'(wall)':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:22s} {r['mode']:9s} {r['syn_steps']:5d}  failed")
            continue
        ref = f"{r.get('speedup_vs_ref', float('nan')):17.2f}x {r.get('wall_speedup_vs_ref', float('nan')):6.2f}x"
        print(f"{r['engine']:22s} {r['mode']:9s} {r['syn_steps']:5d} {r['sec_per_iter']:8.2f} {r['peak_gb']:8.2f} {r['gflop']:8.0f} "
              f"{r['floor_sec']:8.2f} {r['achieved_gflops']:8.0f} {r['cpu_sec_per_iter']:7.2f} {ref}")
    print(f"matmul peak here ({a.threads} threads, best of 10, 1024^3): fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        if "error" not in r:
            r["fp32_matmul_peak_gflops"] = peak["float32"] / 1e9
            r["roofline_fraction"] = r["achieved_gflops"] * 1e9 / peak["float32"]
            r["conv_fraction"] = r["achieved_gflops"] * 1e9 / rate
            print(f"roofline {r['engine']} {r['mode']} {r['syn_steps']} steps: {r['achieved_gflops']:.0f} GFLOP/s = "
                  f"{100 * r['roofline_fraction']:.0f} % of the fp32 matmul peak, {100 * r['conv_fraction']:.0f} % of "
                  f"the measured fp32 conv throughput")
    by = {(r["mode"], r["syn_steps"]): r for r in rows if "error" not in r}
    if ("exact", 10) in by and ("exact", 60) in by:
        print(f"exact: peak at 60 steps / peak at 10 steps = {by[('exact', 60)]['peak_gb'] / by[('exact', 10)]['peak_gb']:.2f}")
    print("reference FLOPs per iteration (create_graph everywhere): "
          + ", ".join(f"{s}: {iteration_flops('unrolled', s)['reference'] / 1e9:.0f} GFLOP" for s in (10, 20, 40, 60)))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"threads": a.threads, "conv_gflops": rate / 1e9, "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
                   "load": os.getloadavg(), "engine": a.engine, "tune_malloc": a.tune_malloc,
                   "rows": rows}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
