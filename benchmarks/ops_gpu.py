"""fedlatent's custom CUDA ops vs the PyTorch reference: per-op time, memory-traffic floor and achieved
bandwidth, and the end-to-end latent-MTT iteration with the ops on (FEDLATENT_OPS=cuda) vs off (=ref).

Per op: mean time per call (CUDA events, ``--reps`` calls after a warm-up, Python dispatch included, as the
library calls it), the op's memory-traffic floor (the bytes an ideal implementation must move: each input
read once, each output written once, see ``FLOOR`` below), the bandwidth the CUDA kernel achieves on that
floor, as a fraction of this GPU's measured device-to-device copy bandwidth, and the largest difference
between the two outputs.

End to end: a latent-MTT iteration (:class:`fedlatent.distill.Distiller` on a
:class:`fedlatent.generators.LatentSet`): the built-in CIFAR-10 layout generator at 32 px (random weights:
timing only), ``--space`` (default F3), ConvNet-D3 student, ipc 10 (100 images), syn_steps 20, exact mode,
per-image DSA. Both arms are built from the same seeds and stepped alternately (ref, cuda, ref, cuda, ...),
so clock drift hits both equally; the table gives the median seconds per iteration and the speedup.

    python benchmarks/ops_gpu.py                          # on a GPU machine (builds the extension first)
    python benchmarks/ops_gpu.py --device cpu --smoke     # tiny CPU smoke run: reference vs emulated kernels

Without a GPU (and without ``--device cpu``) it prints "no GPU: not measured", writes the rows as
"not yet measured" and exits 0. On CPU the second arm is ``emulated`` (the fused autograd Functions on the
PyTorch re-statements of the kernels, :func:`fedlatent.ops.emulate`): it exercises the code path, its times
say nothing about CUDA.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import run_cli, write_results  # noqa: E402

from fedlatent import ops  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Memory-traffic floor in elements (times the element size): n = elements of the main tensor, c = channels.
FLOOR = {
    "bias_act fwd": lambda n, c: 2 * n + c,  # read x (+ b), write y
    "bias_act fwd+bwd": lambda n, c: 5 * n + 2 * c,  # fwd; bwd reads dy, y, writes dx (db fused)
    "sgd_step": lambda n, c: 3 * n,  # read theta, g; write out
    "trajectory_loss fwd": lambda n, c: 3 * n,  # read e, s, t
    "trajectory_loss_and_grad": lambda n, c: 6 * n,  # pass 1 reads e, s, t; pass 2 reads e, t, writes v
    "trajectory_loss fwd+bwd": lambda n, c: 9 * n,  # fwd; bwd reads e, s, t, writes 3 gradients
    "dsa fwd": lambda n, c: 2 * n,  # read x, write y
    "dsa fwd+bwd": lambda n, c: 4 * n,  # fwd; read dy, write dx
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU smoke test of the script)")
    p.add_argument("--reps", type=int, default=200, help="timed calls per op [%(default)s]")
    p.add_argument("--iters", type=int, default=10, help="timed MTT iterations per arm [%(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="untimed MTT iterations per arm [%(default)s]")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--space", default="F3", help="latent space of the built-in generator [%(default)s]")
    p.add_argument("--model", default="convnet-d3")
    p.add_argument("--mode", default="exact", choices=["exact", "unrolled"])
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ops_gpu.json"))
    a = p.parse_args(argv)
    if a.smoke:
        a.reps, a.iters, a.warmup, a.ipc, a.syn_steps = min(a.reps, 3), min(a.iters, 1), min(a.warmup, 1), 1, 2
    return a


@contextmanager
def arm(name: str):
    """Run the ops as ``cuda`` / ``ref`` (FEDLATENT_OPS) or ``emulated`` (fedlatent.ops.emulate)."""
    old = os.environ.get("FEDLATENT_OPS")
    try:
        if name == "emulated":
            os.environ["FEDLATENT_OPS"] = "ref"
            with ops.emulate():
                yield
        else:
            os.environ["FEDLATENT_OPS"] = name
            yield
    finally:
        if old is None:
            os.environ.pop("FEDLATENT_OPS", None)
        else:
            os.environ["FEDLATENT_OPS"] = old


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn, dev: torch.device, reps: int) -> float:
    """Mean seconds per call of ``fn`` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def copy_bandwidth(dev: torch.device) -> float | None:
    """Device-to-device copy bandwidth (bytes/s, read + write) on 256 MiB: the practical peak."""
    if dev.type != "cuda":
        return None
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    sec = time_call(lambda: y.copy_(x), dev, 20)
    return 2 * x.numel() * 4 / sec


def _diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b) if x is not None)


def op_cases(dev: torch.device, smoke: bool, student_numel: int):
    """(name, shape label, n, channels, dtype, make_fn) for every timed op; make_fn() -> a closure to time."""
    from fedlatent.distill.augment import DSA

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    cases = []
    bias_shapes = [(2, 4, 8, 8)] if smoke else [(100, 64, 8, 8), (100, 16, 32, 32), (256, 64, 32, 32)]
    for shape in bias_shapes:
        x, b, dy = rnd(*shape), rnd(shape[1]), rnd(*shape)
        xg, bg = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        n = x.numel()
        cases.append(("bias_act fwd", shape, n, shape[1], lambda x=x, b=b: ops.bias_act(x, b)))
        cases.append(("bias_act fwd+bwd", shape, n, shape[1],
                      lambda xg=xg, bg=bg, dy=dy: torch.autograd.grad(ops.bias_act(xg, bg), (xg, bg), dy)))
    for n in ([1000] if smoke else [student_numel, 16 * 2**20]):
        th, gr, s, t = rnd(n), rnd(n), rnd(n), rnd(n)
        eg, sg, tg = (v.clone().requires_grad_(True) for v in (th, s, t))
        cases.append(("sgd_step", (n,), n, 0, lambda th=th, gr=gr: ops.sgd_step(th, gr, 0.01)))
        cases.append(("trajectory_loss fwd", (n,), n, 0, lambda th=th, s=s, t=t: ops.trajectory_loss(th, s, t)))
        cases.append(("trajectory_loss_and_grad", (n,), n, 0,
                      lambda th=th, s=s, t=t: ops.trajectory_loss_and_grad(th, s, t)))
        cases.append(("trajectory_loss fwd+bwd", (n,), n, 0,
                      lambda eg=eg, sg=sg, tg=tg: torch.autograd.grad(ops.trajectory_loss(eg, sg, tg), (eg, sg, tg))))
    B = 4 if smoke else 100
    for groups in (("color",), ("color", "crop", "cutout", "flip")):
        dsa = DSA("_".join(groups), siamese=False, mode="all")
        x = rnd(B, 3, 32, 32)
        xg, dy = x.clone().requires_grad_(True), rnd(B, 3, 32, 32)
        draw = dsa.draw(B, 32, 32, torch.Generator().manual_seed(1))
        label = f"{B}x3x32x32 {'+'.join(groups)}"
        cases.append(("dsa fwd", label, x.numel(), 3, lambda x=x, d=draw, a=dsa: a.apply(x, d)))
        cases.append(("dsa fwd+bwd", label, x.numel(), 3,
                      lambda xg=xg, dy=dy, d=draw, a=dsa: torch.autograd.grad(a.apply(xg, d), xg, dy)))
    return cases


def run_ops(dev: torch.device, arms: tuple[str, str], a) -> list[dict]:
    from fedlatent.models import get_model

    student_numel = sum(p.numel() for p in get_model(a.model, 3, 10, 32).parameters())
    peak = copy_bandwidth(dev)
    rows = []
    for name, shape, n, c, fn in op_cases(dev, a.smoke, student_numel):
        res = {}
        outs = {}
        for arm_name in arms:
            with arm(arm_name):
                outs[arm_name] = fn()
                res[arm_name] = time_call(fn, dev, a.reps)
        fast, ref = arms[1], arms[0]
        floor = FLOOR[name](n, c) * 4  # float32
        row = {"op": name, "shape": str(shape), "dtype": "float32", f"{ref}_us": res[ref] * 1e6,
               f"{fast}_us": res[fast] * 1e6, "speedup": res[ref] / res[fast], "floor_bytes": floor,
               f"{fast}_GBps": floor / res[fast] / 1e9, f"{ref}_GBps": floor / res[ref] / 1e9,
               "max_abs_diff": _diff(outs[fast], outs[ref])}
        if peak:
            row["copy_GBps"] = peak / 1e9
            row["fraction_of_copy_bw"] = floor / res[fast] / peak
        rows.append(row)
    return rows


def build_distiller(dev: torch.device, a, seed: int = 0):
    from fedlatent.distill.distiller import DistillConfig, Distiller
    from fedlatent.generators.builtin import BuiltinConfig, BuiltinStyleGenerator, as_generator
    from fedlatent.generators.latent import LatentSet
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    torch.manual_seed(seed)
    G = BuiltinStyleGenerator(BuiltinConfig(img_resolution=32, img_channels=3, c_dim=10, dataset="cifar10"))
    gen = as_generator(G.to(dev).eval().requires_grad_(False))
    ls = LatentSet.initialize(gen, a.space, a.ipc, num_classes=10, seed=seed, mean=CIFAR_MEAN, std=CIFAR_STD,
                              chunk_size=128)
    model = get_model(a.model, 3, 10, 32).to(dev)
    flat = FlatModel(model)
    start = flat.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    cfg = DistillConfig(syn_steps=a.syn_steps, mode=a.mode, dsa_siamese=False, seed=seed, lr_img=100.0)
    opt = torch.optim.SGD(ls.param_groups(1.0, 100.0, 0.5), lr=1.0)
    return Distiller(model, ls, ls.labels.to(dev), lambda it: (start, target), cfg, image_optimizer=opt)


def run_e2e(dev: torch.device, arms: tuple[str, str], a) -> dict:
    dist, times, losses = {}, {n: [] for n in arms}, {n: [] for n in arms}
    for name in arms:
        with arm(name):
            dist[name] = build_distiller(dev, a)
    for it in range(a.warmup + a.iters):
        for name in arms:
            with arm(name):
                sync(dev)
                t = time.perf_counter()
                log = dist[name].step()
                sync(dev)
                if it >= a.warmup:
                    times[name].append(time.perf_counter() - t)
                losses[name].append(log.loss)
    ref, fast = arms
    med = {n: statistics.median(times[n]) for n in arms}
    return {"op": "latent MTT iteration", "shape": f"builtin cifar10 32px {a.space}, {a.model}, ipc {a.ipc}, "
            f"syn_steps {a.syn_steps}, {a.mode}", f"{ref}_s": med[ref], f"{fast}_s": med[fast],
            "speedup": med[ref] / med[fast], f"{ref}_times": times[ref], f"{fast}_times": times[fast],
            "first_loss_rel_diff": abs(losses[fast][0] - losses[ref][0]) / max(abs(losses[ref][0]), 1e-30),
            "losses": losses}


def print_table(rows: list[dict], arms: tuple[str, str]) -> None:
    ref, fast = arms
    hdr = (f"{'op':26s} {'shape':30s} {ref + ' us':>10s} {fast + ' us':>12s} {'speedup':>8s} {'floor MB':>9s} "
           f"{fast + ' GB/s':>12s} {'% copy bw':>9s} {'max|diff|':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "status" in r:
            print(f"{r['op']:26s} {r.get('shape', ''):30s} {r['status']}")
        elif r["op"] == "latent MTT iteration":
            print(f"{r['op']:26s} {'(seconds per iteration)':30s} {r[ref + '_s']:10.3f} {r[fast + '_s']:12.3f} "
                  f"{r['speedup']:7.2f}x   first-iteration loss rel. diff {r['first_loss_rel_diff']:.1e}")
            print(f"    {r['shape']}")
        else:
            frac = f"{100 * r['fraction_of_copy_bw']:8.1f}%" if "fraction_of_copy_bw" in r else f"{'n/a':>9s}"
            print(f"{r['op']:26s} {r['shape']:30s} {r[ref + '_us']:10.1f} {r[fast + '_us']:12.1f} "
                  f"{r['speedup']:7.2f}x {r['floor_bytes'] / 1e6:9.2f} {r[fast + '_GBps']:12.1f} {frac} "
                  f"{r['max_abs_diff']:10.1e}")


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    dev = torch.device(a.device)
    settings = {k: v for k, v in vars(a).items()}
    out = Path(a.out)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no GPU: not measured (torch.cuda.is_available() is False); run with --device cpu --smoke for a "
              "reference-path smoke test")
        rows = [{"op": name, "status": "not yet measured (no GPU)"} for name in FLOOR]
        rows.append({"op": "latent MTT iteration", "status": "not yet measured (no GPU)"})
        settings["gpu"] = None
        write_results(out, "ops_gpu", settings, rows, t0)
        print(f"wrote {out}")
        return 0
    if dev.type == "cuda":
        st = ops.status(build=True)
        settings["gpu"] = torch.cuda.get_device_name(dev)
        settings["ops_status"] = st
        if not st["loaded"]:
            print(f"error: the CUDA extension did not build: {st['error']}", file=sys.stderr)
            return 1
        print(f"GPU: {settings['gpu']}; extension {st['build_dir']} "
              f"(built in {st['build_seconds']:.1f} s)" if st["build_seconds"] else f"GPU: {settings['gpu']}")
        arms = ("ref", "cuda")
    else:
        settings["gpu"] = None
        arms = ("ref", "emulated")
        print("CPU run: 'emulated' = fused autograd Functions on PyTorch re-statements of the kernels (not CUDA)")
    rows = run_ops(dev, arms, a)
    if not a.skip_e2e:
        rows.append(run_e2e(dev, arms, a))
    print_table(rows, arms)
    write_results(out, "ops_gpu", settings, rows, t0)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
