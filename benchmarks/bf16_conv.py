"""bf16 convolutions on this machine: fp32, oneDNN's bf16 and the kernel's emulated bf16, time and error side by side.

The ConvNet kernel's bf16 engines (``convnet-bf16[-compiled]``) mean bf16 operands, fp32 sums, bf16 results. On
hardware with bf16 arithmetic (:func:`fedlatent.distill.compiled.native_bf16`) oneDNN does that; elsewhere the
kernel emulates it (bf16-rounded operands, fp32 convolution, rounded result). For the 3x3 convolutions of the MTT
student at the FedDGM cell's size (width 32, 32 px, 20 images) and the reference MTT size (width 128, 32 px, 100
images), one forward and one backward (input and weight gradients), this times

* ``fp32``: the fp32 convolution;
* ``bf16 oneDNN``: the convolution of bf16 tensors (what the kernel runs where bf16 is native);
* ``bf16 emulated``: the kernel's emulation (``ConvNetKernel(..., conv_dtype=torch.bfloat16)`` with
  ``emulate=True``),

interleaved, medians of ``--repeats``, and gives each bf16 path's relative L2 error against the exact (float64)
convolution of the bf16-rounded operands rounded to bf16 (0 = exactly "bf16 operands, exact sums, bf16 result";
the rounding of the result alone is ~1.6e-3). Prints the table, writes JSON.

    nice -n 5 python benchmarks/bf16_conv.py --threads 1 --repeats 5 --out OUT.json
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import machine_info  # noqa: E402

SHAPES = {"cell (width 32, 32 px, 20 images)": (20, 32, 32),
          "reference MTT (width 128, 32 px, 100 images)": (100, 128, 32)}


def _bwd(go, x, w):
    return torch.ops.aten.convolution_backward(go, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [True, True, False])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_conv.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fedlatent.distill.compiled import native_bf16
    from fedlatent.distill.kernels import ConvNetKernel
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    rows, out = [], []
    for label, (n, c, s) in SHAPES.items():
        kern = ConvNetKernel(FlatModel(get_model(f"convnet-d3:width={c}", 3, 10, s)), conv_dtype=torch.bfloat16)
        kern.emulate = True
        x = torch.randn(n, c, s, s, generator=g).contiguous(memory_format=cl)
        w = torch.randn(c, c, 3, 3, generator=g)
        go = torch.randn(n, c, s, s, generator=g).contiguous(memory_format=cl)
        xb, wb, gb = x.bfloat16(), w.bfloat16(), go.bfloat16()
        paths = {
            "fp32": lambda: (F.conv2d(x, w, padding=1), *_bwd(go, x, w)[:2]),
            "bf16 oneDNN": lambda: (F.conv2d(xb, wb, padding=1), *_bwd(gb, xb, wb)[:2]),
            "bf16 emulated": lambda: (kern._conv(x, w, None), *kern._conv_bwd(go, x, w, [True, True, False])[:2]),
        }

        def r(t):
            return t.bfloat16().double()

        exact = (F.conv2d(r(x), r(w), padding=1), *_bwd(r(go), r(x), r(w))[:2])
        want = [r(t) for t in exact]
        errs = {k: [float((o.double() - e).norm() / e.norm()) for o, e in zip(fn(), want)] if k != "fp32" else []
                for k, fn in paths.items()}
        times = {k: [] for k in paths}
        for i in range(a.repeats + 1):
            for k, fn in (paths.items() if i % 2 else reversed(paths.items())):
                t = time.perf_counter()
                fn()
                if i:  # the first pass warms up
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in paths:
            rows.append((label, k, med[k], med[k] / med["fp32"], *errs[k]))
        out.append({"shape": label, "images": n, "width": c, "size": s, "times_s": times, "median_s": med,
                    "rel_err_vs_rounded_exact": errs})
    print(f"3x3 convolution forward + backward (input and weight gradients), {a.threads} thread(s), medians of "
          f"{a.repeats}; native bf16 on this CPU: {native_bf16('cpu')}")
    print(f"{'shape':46s} {'path':14s} {'ms':>9s} {'x fp32':>7s} {'err fwd':>9s} {'err dx':>9s} {'err dw':>9s}")
    for label, k, t, rel, *e in rows:
        print(f"{label:46s} {k:14s} {1e3 * t:9.1f} {rel:7.2f} " + " ".join(f"{v:9.1e}" for v in e or [math.nan] * 3))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "native_bf16": native_bf16("cpu"), "results": out, "machine": machine_info()},
                  f, indent=2)


if __name__ == "__main__":
    main()
