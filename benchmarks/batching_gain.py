"""What batching K clients gains in each phase of a FedDGM latent-MTT iteration: K separate calls vs one.

The FedDGM server of the default CIFAR-10 cell (``cifar10-cpu`` preset: K = 10 clients, ConvNet-D3 width 32
students, 32 px, ipc 2 x 10 classes = N = 20 images each, 8 syn_steps, per-image DSA, the built-in ``cifar10``
generator in its default latent space). Each row times the same work done client by client (``K separate``) and
as one batched call (``one batched``), interleaved, medians of ``--repeats``:

* ``render + backward``: K latent sets of N images through the generator and back, or one set of K N images
  (the generator is shared by every client: the one phase whose weights the clients share);
* ``DSA forward + backward``: per-image augmentation (every transformation group) of K minibatches of N, or of
  one of K N;
* ``conv L forward`` / ``conv L backward``: the students' convolutions at layer L's shapes, K separate
  convolutions or one grouped convolution (``groups=K``: the grouped students of
  :func:`fedlatent.distill.batched.batched_meta_gradient`);
* ``MTT meta-gradient``: :func:`fedlatent.distill.mtt.meta_gradient` per client against
  :func:`~fedlatent.distill.batched.batched_meta_gradient` of all K, with the same engine (``--engine``).

A ratio below 1 is what batching could save in that phase; the last line adds up the iteration's phases (render +
backward, and the meta-gradient with its DSA; the convolutions are inside the meta-gradient): the batched
iteration's time over the loop's if both were batched (the optimiser steps, a few ms, are left out). Prints the
table, writes JSON.

    nice -n 5 python benchmarks/batching_gain.py --threads 2 --repeats 5 --out OUT.json
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


def _latent_sets(K: int, ipc: int, classes: int, dataset: str):
    from fedlatent.generators.latent import LatentSet
    from fedlatent.generators.resolve import default_generator, default_space, worker_generator

    name = default_generator(dataset)
    G = worker_generator(name, "cpu")
    space = default_space(G)
    norm = dict(mean=(0.5,) * G.img_channels, std=(0.5,) * G.img_channels)
    sets = [LatentSet.initialize(G, space, ipc, num_classes=classes, seed=k, **norm) for k in range(K)]
    full = [s.ws if s.ws_head is None else torch.cat([s.ws_head, s.ws], 1) for s in sets]
    one = LatentSet(G, space, torch.cat([s.labels for s in sets]), ws=torch.cat(full),
                    f=None if sets[0].f is None else torch.cat([s.f for s in sets]), chunk_size=K * len(sets[0]),
                    **norm)
    for s in sets:
        s.chunk_size = max(s.chunk_size, len(s))  # one chunk each: both sides render once (no re-render)
    return sets, one, f"{name} {space}"


def _render_backward(s) -> None:
    x = s.render()
    s.backward(torch.ones_like(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--ipc", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--syn-steps", type=int, default=8)
    p.add_argument("--dataset", default="cifar10", help="whose built-in generator renders [%(default)s]")
    p.add_argument("--engine", default="fast", help="MTT engine of both meta-gradient rows [%(default)s]")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batching_gain.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fedlatent.distill import batched as B
    from fedlatent.distill.augment import DSA
    from fedlatent.distill.compiled import fast_engine
    from fedlatent.distill.mtt import make_plan, meta_gradient, tune_allocator
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    tune_allocator()
    K, N, C, S = a.clients, a.ipc * a.classes, a.width, a.size
    g = torch.Generator().manual_seed(0)
    rows: dict[str, tuple] = {}  # phase -> (K separate fn, one batched fn)

    sets, one, gen_name = _latent_sets(K, a.ipc, a.classes, a.dataset)
    rows["render + backward"] = (lambda: [_render_backward(s) for s in sets], lambda: _render_backward(one))

    dsa = DSA(siamese=False)  # the meta-gradient's: one transformation group per call, per-image parameters
    dsa_all = DSA(siamese=False, mode="all")  # every group, so that both sides of the row do the same work
    xs = [torch.randn(N, 3, S, S, generator=g).requires_grad_(True) for _ in range(K)]
    xall = torch.cat([x.detach() for x in xs]).requires_grad_(True)

    def dsa_fb(x, seed):
        dsa_all(x, seed).sum().backward()

    rows["DSA forward + backward"] = (lambda: [dsa_fb(x, k) for k, x in enumerate(xs)], lambda: dsa_fb(xall, 0))

    cl = torch.channels_last
    size, cin = S, 3
    for layer in range(3):  # ConvNet-D3: 3x3 convolutions at S, S/2, S/4
        xk = [torch.randn(N, cin, size, size, generator=g).contiguous(memory_format=cl) for _ in range(K)]
        wk = [torch.randn(C, cin, 3, 3, generator=g) for _ in range(K)]
        gk = [torch.randn(N, C, size, size, generator=g).contiguous(memory_format=cl) for _ in range(K)]
        xg = torch.cat(xk, 1).contiguous(memory_format=cl)
        wg, gg = torch.cat(wk), torch.cat(gk, 1).contiguous(memory_format=cl)

        def bwd(go, x, w, groups):
            return torch.ops.aten.convolution_backward(go, x, w, [w.shape[0]], [1, 1], [1, 1], [1, 1], False,
                                                       [0, 0], groups, [layer > 0, True, True])

        rows[f"conv {layer + 1} forward ({cin}->{C}, {size} px)"] = (
            lambda xk=xk, wk=wk: [F.conv2d(x, w, padding=1) for x, w in zip(xk, wk)],
            lambda xg=xg, wg=wg: F.conv2d(xg, wg, padding=1, groups=K))
        rows[f"conv {layer + 1} backward"] = (
            lambda xk=xk, wk=wk, gk=gk: [bwd(go, x, w, 1) for go, x, w in zip(gk, xk, wk)],
            lambda xg=xg, wg=wg, gg=gg: bwd(gg, xg, wg, K))
        size, cin = size // 2, C

    model = get_model(f"convnet-d3:width={C}", 3, a.classes, S)
    flat = FlatModel(model)
    th0 = flat.flatten()
    starts = torch.stack([th0 + 0.01 * torch.randn(th0.shape, generator=g) for _ in range(K)])
    ends = starts + 0.01 * torch.randn(starts.shape, generator=g)
    imgs = torch.randn(K, N, 3, S, S, generator=g)
    labels = (torch.arange(N) % a.classes).repeat(K, 1)
    log_lr = torch.full((K,), math.log(0.01))
    plans = [make_plan(N, a.syn_steps, N, seed=k) for k in range(K)]
    engine = fast_engine("cpu") if a.engine == "fast" else a.engine
    rows["MTT meta-gradient"] = (
        lambda: [meta_gradient(flat, starts[k], ends[k], imgs[k], labels[k], log_lr[k], plans[k], dsa,
                               mode="exact", engine=a.engine) for k in range(K)],
        lambda: B.batched_meta_gradient(flat, starts, ends, imgs, labels, log_lr, plans, dsa, engine=a.engine))

    for sep, bat in rows.values():  # warm-up (a compiled engine compiles here)
        sep(), bat()
    times = {k: ([], []) for k in rows}
    loads = []
    for r in range(a.repeats):
        for k, (sep, bat) in rows.items():
            for i, fn in enumerate((sep, bat) if r % 2 == 0 else (bat, sep)):  # alternate which goes first
                t = time.perf_counter()
                fn()
                times[k][i if r % 2 == 0 else 1 - i].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    med = {k: (statistics.median(s), statistics.median(b)) for k, (s, b) in times.items()}
    print(f"K = {K} clients x N = {N} images, ConvNet-D3 width {C}, {S} px, {a.syn_steps} syn_steps, per-image DSA, "
          f"generator {gen_name}, MTT engine {a.engine} ({engine}), {a.threads} threads; medians of {a.repeats} "
          f"interleaved repeats; load average {min(loads):.1f}-{max(loads):.1f}")
    w = max(map(len, rows))
    print(f"{'phase':{w}s} {'K separate ms':>14s} {'one batched ms':>15s} {'batched / separate':>19s}")
    for k, (s, b) in med.items():
        print(f"{k:{w}s} {1e3 * s:14.1f} {1e3 * b:15.1f} {b / s:19.2f}")
    it = ["render + backward", "MTT meta-gradient"]  # the meta-gradient includes its DSA
    sep_t, bat_t = sum(med[k][0] for k in it), sum(med[k][1] for k in it)
    print(f"{'iteration (' + ' + '.join(it) + ')':{w}s} {1e3 * sep_t:14.1f} {1e3 * bat_t:15.1f} {bat_t / sep_t:19.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "engine": engine, "generator": gen_name,
                   "times_s": {k: {"separate": s, "batched": b} for k, (s, b) in times.items()},
                   "median_s": {k: {"separate": s, "batched": b, "ratio": b / s} for k, (s, b) in med.items()},
                   "iteration": {"phases": it, "separate_s": sep_t, "batched_s": bat_t, "ratio": bat_t / sep_t},
                   "load": loads, "machine": machine_info(),
                   "cpu_flags": _cpu_flags()}, f, indent=2)


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
        return sorted(x for x in flags if x.startswith(("avx", "amx")))
    except (OSError, StopIteration):
        return []


if __name__ == "__main__":
    main()
