"""torch.compile (inductor, CPU C++ codegen) on the exact-mode MTT meta-gradient of the ConvNet kernel.

Same problem as ``benchmarks/mtt_speed.py``: ConvNet-D3 width 128, 32 px, 3 channels, 10 classes, 100 synthetic
images, batch_syn 100, per-image DSA, exact (constant-memory adjoint) mode, glibc malloc tuning on. Variants
(each in its own process, with its own fresh inductor cache so that the reported compile time is a cold compile):

* ``fp32``            — ``ConvNetKernel`` as is (``engine="convnet"``), the baseline;
* ``fp32-compiled``   — ``engine="convnet-compiled"``: ``ConvNetKernel.forward`` and ``.rop`` (the whole per-step
  forward + backward and the R-operator: every instance-norm forward / backward / tangent pass) under
  ``torch.compile(dynamic=False)``;
* ``fp32-compiled-fast`` — the same with inductor's C++ flags ``-ffp-contract=fast`` and ``-ffast-math``;
* ``fp32-compiled-autotune`` — ``mode="max-autotune-no-cudagraphs"``;
* ``bf16`` / ``bf16-compiled`` — ``engine="convnet-bf16"`` / ``"convnet-bf16-compiled"`` (bf16 convolution
  operands), plain and compiled;
* ``f64`` / ``f64-compiled`` — float64 (the accuracy yardstick: fp32 variants are compared against ``f64``).

Warm-up iterations (which compile) are timed separately; the compile time is the first iteration's wall time minus
the median of the timed ones. Wall and CPU (``time.process_time``) seconds per meta-gradient, medians; the load
average is sampled before and after every variant. The meta-gradient of plan seed 0 (the first warm-up) of every
variant is compared to the baseline's and to ``f64``'s (relative L2 of dX, relative error of d log_lr and loss).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/mtt_compile.py --steps 10 --iters 3 --threads 1 \\
        --variants fp32,fp32-compiled,bf16,bf16-compiled --passes 1

The oneDNN graph fuser of TorchScript (``torch.jit.enable_onednn_fusion``) is measured on the student's forward
pass alone (``--onednn``): it has no backward / R-operator ops, and the tracer rejects ``convolution_backward``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

B, C_IN, SIZE, WIDTH, CLASSES = 100, 3, 32, 128, 10

# variant -> (engine, dtype, torch.compile mode (None: the default), inductor config overrides)
VARIANTS = {
    "fp32": ("convnet", "float32", None, {}),
    "fp32-compiled": ("convnet-compiled", "float32", None, {}),
    "fp32-compiled-fast": ("convnet-compiled", "float32", None,
                           {"cpp.enable_floating_point_contract_flag": "fast", "cpp.enable_unsafe_math_opt_flag": True}),
    "fp32-compiled-autotune": ("convnet-compiled", "float32", "max-autotune-no-cudagraphs", {}),
    "bf16": ("convnet-bf16", "float32", None, {}),
    "bf16-compiled": ("convnet-bf16-compiled", "float32", None, {}),
    "f64": ("convnet", "float64", None, {}),
    "f64-compiled": ("convnet-compiled", "float64", None, {}),
}


def _problem(dtype):
    import torch

    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same initial weights in every worker (the variants' gradients are compared)
    flat = FlatModel(get_model(f"convnet-d3:width={WIDTH}", C_IN, CLASSES, SIZE))
    start = flat.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    images = torch.randn(B, C_IN, SIZE, SIZE, generator=g)
    labels = torch.arange(B) % CLASSES
    return flat, start.to(dtype), target.to(dtype), images.to(dtype), labels


def _configure_compile(mode: str | None, opts: dict) -> None:
    """torch.compile mode and inductor options of the compiled ConvNet kernel (this worker process only)."""
    import torch._inductor.config as ic

    from fedlatent import compiling

    for k, v in opts.items():
        obj, name = ic, k
        while "." in name:
            head, name = name.split(".", 1)
            obj = getattr(obj, head)
        setattr(obj, name, v)
    if mode is not None:
        compiling.COMPILE_OPTIONS["mode"] = mode


def worker(a: argparse.Namespace) -> None:
    import torch

    from fedlatent.distill.augment import DSA
    from fedlatent.distill.mtt import make_plan, meta_gradient, tune_allocator

    engine, dtype, mode, opts = VARIANTS[a.variant]
    torch.set_num_threads(a.threads)
    tune_allocator()
    _configure_compile(mode, opts)
    flat, start, target, images, labels = _problem(getattr(torch, dtype))
    dsa = DSA(siamese=False)  # per-image draws (the reference's choice)
    log_lr = torch.tensor(math.log(0.01), dtype=images.dtype)
    walls, cpus = [], []
    for it in range(a.warmup + a.iters):
        plan = make_plan(B, a.syn_steps, B, seed=it)
        t, c = time.perf_counter(), time.process_time()
        res = meta_gradient(flat, start, target, images, labels, log_lr, plan, dsa, mode="exact", engine=engine)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        if it == 0:
            torch.save({"dX": res.grad_images.double(), "dlog": res.grad_log_lr.double(), "loss": res.loss},
                       a.save)
    prof = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            meta_gradient(flat, start, target, images, labels, log_lr, make_plan(B, a.syn_steps, B, seed=0), dsa,
                          mode="exact", engine=engine)
        ev = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
        tot = sum(e.self_cpu_time_total for e in ev)
        prof = [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / tot) for e in ev[:14]]
    print(json.dumps({"walls": walls, "cpus": cpus, "profile": prof}))


def onednn_step(a: argparse.Namespace) -> dict:
    """The student's forward pass (logits of the 100-image batch): eager vs a frozen TorchScript trace with the
    oneDNN graph fuser on (the fuser's documented use; it fuses from the third call on). The fuser knows forward
    ops only (conv, norm, relu, pool, linear): the kernel's backward and R-operator (``convolution_backward``,
    ``threshold_backward``, the instance-norm backward and its tangent) cannot be traced into it."""
    import torch

    torch.set_num_threads(a.threads)
    flat, _, _, images, _ = _problem(torch.float32)
    model = flat.model.eval()
    x = images.contiguous(memory_format=torch.channels_last)
    out = {}
    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(model, (x,)))
            t = time.perf_counter()
            for _ in range(3):
                traced(x)
            out["warmup_s"] = time.perf_counter() - t
            ref, got = model(x), traced(x)
            out["rel_diff"] = float((got - ref).norm() / ref.norm())
            out["graph_has_llga"] = "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
            for name, fn in (("eager", model), ("onednn-traced", traced)):
                w, c = [], []
                for _ in range(a.iters + 2):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(x)
                    w.append(time.perf_counter() - t0)
                    c.append(time.process_time() - c0)
                out[name] = {"wall": statistics.median(w), "cpu": statistics.median(c)}
    finally:
        torch.jit.enable_onednn_fusion(False)
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="syn_steps")
    p.add_argument("--variants", default="fp32,fp32-compiled,bf16,bf16-compiled")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations (the first one compiles)")
    p.add_argument("--passes", type=int, default=1, help="repeat the variant list (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="op profile (self CPU) of one more iteration per variant")
    p.add_argument("--onednn", action="store_true", help="also time the oneDNN-graph-fused TorchScript step")
    p.add_argument("--out", default="benchmarks/results/mtt_compile.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--onednn-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--syn-steps", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.onednn_worker:
        print(json.dumps(onednn_step(a)))
        return
    import torch

    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} ({', '.join(VARIANTS)})")
    env0 = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    rows, grads = [], {}
    tmp = tempfile.mkdtemp(prefix="mtt_compile_")
    for pass_ in range(a.passes):
        for v in variants:
            save = os.path.join(tmp, f"{v}.pt")
            env = dict(env0, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor_", dir=tmp))
            iters = 1 if v.startswith("f64") else a.iters  # the accuracy yardstick: one timed iteration is enough
            cmd = [sys.executable, __file__, "--worker", "--variant", v, "--syn-steps", str(a.steps), "--iters",
                   str(iters), "--warmup", str(a.warmup), "--threads", str(a.threads), "--save", save]
            cmd += ["--profile"] if a.profile and pass_ == 0 else []
            load0 = os.getloadavg()[0]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            load1 = os.getloadavg()[0]
            if r.returncode != 0:
                print(f"{v}: worker failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                rows.append({"variant": v, "pass": pass_, "error": r.stderr[-1000:]})
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            walls, cpus = res["walls"][a.warmup:], res["cpus"][a.warmup:]
            row = {"variant": v, "pass": pass_, "syn_steps": a.steps, "wall_s": statistics.median(walls),
                   "cpu_s": statistics.median(cpus), "walls": walls, "cpus": cpus,
                   "first_wall_s": res["walls"][0], "first_cpu_s": res["cpus"][0],
                   "load": [load0, load1], "profile": res["profile"]}
            row["compile_wall_s"] = row["first_wall_s"] - row["wall_s"]
            row["compile_cpu_s"] = row["first_cpu_s"] - row["cpu_s"]
            rows.append(row)
            grads.setdefault(v, torch.load(save))
            print(f"  done {v} (pass {pass_}): {row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} s CPU, "
                  f"first {row['first_wall_s']:.1f} s, load {load0:.1f}-{load1:.1f}", file=sys.stderr, flush=True)

    base = variants[0]
    ok = [r for r in rows if "error" not in r]
    med = {v: (statistics.median([r["wall_s"] for r in ok if r["variant"] == v]),
               statistics.median([r["cpu_s"] for r in ok if r["variant"] == v])) for v in {r["variant"] for r in ok}}
    acc = {}
    for v, gr in grads.items():
        d = {}
        for refname in (base, "f64"):
            if refname in grads and refname != v:
                ref = grads[refname]
                d[f"dX_vs_{refname}"] = _rel(gr["dX"], ref["dX"])
                d[f"dlog_vs_{refname}"] = float(abs(gr["dlog"] - ref["dlog"]) / abs(ref["dlog"]))
                d[f"loss_vs_{refname}"] = abs(gr["loss"] - ref["loss"]) / abs(ref["loss"])
        acc[v] = d
    print(f"\nexact-mode MTT meta-gradient, ConvNet-D3 w{WIDTH}, {B} images, syn_steps {a.steps}, per-image DSA, "
          f"{a.threads} thread(s), torch {torch.__version__}")
    hdr = (f"{'variant':24s} {'pass':>4s} {'wall s':>7s} {'CPU s':>7s} {'x CPU':>6s} {'x wall':>6s} "
           f"{'dX vs base':>10s} {'dX vs f64':>10s} {'compile s':>9s} {'load':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:24s} {r['pass']:4d}  failed")
            continue
        bw, bc = med.get(base, (float("nan"),) * 2)
        d = acc.get(r["variant"], {})
        print(f"{r['variant']:24s} {r['pass']:4d} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {bc / r['cpu_s']:5.2f}x "
              f"{bw / r['wall_s']:5.2f}x {d.get(f'dX_vs_{base}', float('nan')):10.2e} "
              f"{d.get('dX_vs_f64', float('nan')):10.2e} {r['compile_wall_s']:9.1f} "
              f"{r['load'][0]:4.1f}-{r['load'][1]:<4.1f}")
    for v, d in acc.items():
        if d:
            print(f"accuracy {v}: " + ", ".join(f"{k} {x:.2e}" for k, x in d.items()))
    for r in ok:
        if r["profile"]:
            print(f"\nop profile, {r['variant']} (self CPU s, share):")
            for name, s, frac in r["profile"]:
                print(f"  {name[:60]:60s} {s:8.2f} {100 * frac:5.1f} %")
    onednn = None
    if a.onednn:
        r = subprocess.run([sys.executable, __file__, "--onednn-worker", "--iters", str(a.iters), "--threads",
                            str(a.threads)], capture_output=True, text=True, env=env0)
        if r.returncode == 0:
            onednn = json.loads(r.stdout.strip().splitlines()[-1])
            e, o = onednn["eager"], onednn["onednn-traced"]
            print(f"\noneDNN graph fuser, the student's forward pass (no gradient): eager {e['wall']:.3f} s wall "
                  f"{e['cpu']:.3f} s CPU, traced+fused {o['wall']:.3f} s wall {o['cpu']:.3f} s CPU "
                  f"({e['cpu'] / o['cpu']:.2f}x CPU), fusion groups in the graph: {onednn['graph_has_llga']}, "
                  f"rel diff {onednn['rel_diff']:.1e}")
        else:
            onednn = {"error": r.stderr[-1000:]}
            print(f"oneDNN graph fuser failed:\n{r.stderr[-2000:]}", file=sys.stderr)
    print(f"load average at the end: {os.getloadavg()}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"syn_steps": a.steps, "threads": a.threads, "torch": torch.__version__, "rows": rows,
                   "accuracy": acc, "onednn": onednn, "load_end": os.getloadavg()}, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
