"""Multi-client trajectory matching: several clients' MTT iterations, looped or as one batched computation.

**Batched** (:func:`batched_meta_gradient`): several independent MTT problems (e.g. one per FedDGM client) run
as one computation. For the ConvNet the K students are one *grouped* network
(:class:`~fedlatent.distill.kernels.ConvNetKernel` with ``groups=K``: student k's channels are the k-th group of
every feature map, the convolutions are grouped, the classifier a batched matmul over stacked weights) and the
exact meta-gradient runs through the same hand-written forward / backward / R-operator as the loop, with the
loop's MTT engine (bf16 convolution operands and / or compiled, ``DistillConfig.engine``); the summed loss has a
block-diagonal Hessian, so every block is exactly that student's. Other architectures fall back to
``torch.func.vmap`` over the problems. Step sizes, plans and augmentations stay per problem, and everything
around the meta-gradient (rendering, latent backward, optimisers: :meth:`fedlatent.distill.distiller.Distiller.apply`)
uses the same objects as the looped path, so the two paths compute the same numbers up to floating-point
reassociation (float64 tests: 1e-9).

**Memory budget**: the number of problems per batch (and of clients at once in threads) comes from
:func:`client_bytes` and :func:`available_bytes` (:func:`choose_batch`). FedDGM's ``batched="auto"`` batches on
CUDA only: on CPU the grouped batch measured slower than the loop (``benchmarks/batching_gain.py``,
``benchmarks/RESULTS.md``: rendering 200 images at once is no faster than ten renders of 20, and oneDNN's grouped
convolutions are up to 2x slower than K separate ones).

**Concurrent** (``distill_clients(..., batched="threads")``, FedDGM's ``"auto"`` on a CPU): the loop, several
clients at a time in worker threads of one intra-op thread each; bitwise the one-thread loop whatever the number of
cores (on the 2-core CPUs of ``benchmarks/RESULTS.md`` 0.86-0.98x the loop's time, ``benchmarks/clients_speed.py``).

:func:`distill_clients` runs a list of :class:`~fedlatent.distill.distiller.Distiller` s in any of these ways.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import DivergedError, FedLatentError, is_diverged
from ..models.functional import FlatModel
from ..utils import derive_seed
from .distiller import Distiller, IterationLog
from .kernels import ConvNetKernel, make_kernel
from .mtt import MetaGrad, make_plan, trajectory_loss, validate_inputs

def _functional(flat: FlatModel):
    """Per-client functions for vmap: (grad, loss) of the student loss, and the second-order products."""
    from torch.func import functional_call, grad, grad_and_value

    model = flat.model

    def loss_fn(theta, x, y):
        return F.cross_entropy(functional_call(model, flat.params(theta), (x,)), y)

    g_fn = grad(loss_fn)

    def s_fn(theta, x, y, u):  # s = g . u; ds/dtheta = H u, ds/dx = (dg/dx)^T u
        return (g_fn(theta, x, y) * u).sum()

    return grad_and_value(loss_fn), grad(s_fn, argnums=(0, 1)), grad(s_fn, argnums=1)


def batched_meta_gradient(flat: FlatModel, theta_start: torch.Tensor, theta_target: torch.Tensor,
                          images: torch.Tensor, labels: torch.Tensor, log_lr: torch.Tensor,
                          plans: Sequence[Sequence], augment: Callable | None, engine: str = "auto") -> list[MetaGrad]:
    """MTT meta-gradients (exact mode) of ``K`` independent problems in one vectorised pass.

    ``theta_start`` / ``theta_target`` ``[K, P]``, ``images`` ``[K, N, C, H, W]``, ``labels`` int ``[K, N]``,
    ``log_lr`` ``[K]``, ``plans[k]`` the step plan of problem ``k`` (all of the same length). Problem ``k`` gets
    exactly what :func:`fedlatent.distill.mtt.meta_gradient` computes for it alone (MTT eqs. 1-2 and the adjoint
    recursion ``v_n = v_{n+1} + H_n u``, ``u = -alpha_k v_{n+1}``, ``dX += (dg_n/dX)^T u``,
    ``d log_lr += g_n . u``): the per-step gradients and second-order products come from the grouped ConvNet
    kernel (or are ``vmap``-ed over ``k`` for other models and for ``engine="autograd"``); minibatches and
    augmentation stay per problem. ``engine``: the MTT engine (:func:`~fedlatent.distill.kernels.make_kernel`),
    as the loop's ``meta_gradient(..., engine=)``: bf16 convolutions and / or compiled, grouped.
    """
    K = int(theta_start.shape[0])
    if not (theta_target.shape[0] == images.shape[0] == labels.shape[0] == log_lr.shape[0] == len(plans) == K):
        raise FedLatentError("batched_meta_gradient: inconsistent number of problems")
    if labels.dtype.is_floating_point:
        raise FedLatentError("batched_meta_gradient supports hard labels only")
    steps = {len(p) for p in plans}
    if len(steps) != 1 or 0 in steps:
        raise FedLatentError("batched_meta_gradient: every problem needs the same non-zero number of steps")
    dists = [validate_inputs(flat, theta_start[k], theta_target[k], images[k], labels[k], log_lr[k]) for k in range(K)]
    dt, dev = images.dtype, images.device
    theta_start, theta_target = theta_start.detach().to(dt), theta_target.detach().to(dt)
    alpha = log_lr.detach().to(dt).exp()
    # the K students as one grouped network (ConvNetKernel groups=K); one problem is the plain kernel
    kern = make_kernel(flat, engine, groups=K)
    if kern is not None:
        one = (lambda t: t[0]) if K == 1 else (lambda t: t)
        back = (lambda t: None if t is None else t.unsqueeze(0)) if K == 1 else (lambda t: t)

        def gv(theta, xa, yb):
            loss, g, _ = kern.forward(one(theta), one(xa), one(yb), keep=False)
            return back(g), back(loss)

        def rop(theta, xa, yb, u, need_theta=True):  # the step recomputed and its R-operator (one compiled graph)
            hu, dxa, _ = kern.recompute_rop(one(theta), one(xa), one(yb), one(u), need_theta=need_theta)
            return back(hu), back(dxa)

        def rop_x(theta, xa, yb, u):
            return rop(theta, xa, yb, u, need_theta=False)[1]
    else:
        from torch.func import vmap

        gv_fn, rop_fn, rop_x_fn = _functional(flat)
        gv, rop, rop_x = vmap(gv_fn), vmap(rop_fn), vmap(rop_x_fn)

    def batch(n: int, grad: bool):
        leaves, outs, ys = [], [], []
        for k in range(K):
            st = plans[k][n]
            xb = images[k][st.indices]
            if grad:
                xb = xb.detach().requires_grad_(True)
            with torch.set_grad_enabled(grad):
                xa = augment(xb, st.seed) if augment is not None else xb
            leaves.append(xb)
            outs.append(xa)
            ys.append(labels[k][st.indices])
        return leaves, outs, torch.stack([o.detach() for o in outs]), torch.stack(ys)

    thetas, gs = [theta_start], []
    theta = theta_start
    for n in range(steps.pop()):
        _, _, xa, yb = batch(n, grad=False)
        g, loss_n = gv(theta, xa, yb)
        if not (torch.isfinite(loss_n).all() and torch.isfinite(g).all()):
            raise DivergedError("non-finite student loss/gradient in trajectory matching (diverged: lower lr_img/"
                                 "lr_lr or the initial lr); the last good synthetic set is kept")
        gs.append(g)
        theta = theta - alpha[:, None] * g
        thetas.append(theta)
    denom = (theta_start - theta_target).pow(2).sum(1)
    losses = [float(trajectory_loss(theta[k], theta_start[k], theta_target[k])) for k in range(K)]
    v = 2.0 * (theta - theta_target) / denom[:, None]
    dX = torch.zeros_like(images)
    dlog = torch.zeros(K, dtype=dt, device=dev)
    for n in range(len(gs) - 1, -1, -1):
        leaves, outs, xa, yb = batch(n, grad=True)
        u = -alpha[:, None] * v
        dlog += (gs[n] * u).sum(1)
        if n > 0:
            hu, dxa = rop(thetas[n], xa, yb, u)
            v = v + hu
        else:
            dxa = rop_x(thetas[n], xa, yb, u)
        for k in range(K):
            xb, xo = leaves[k], outs[k]
            if xo is not xb and xo.requires_grad:
                (dxb,) = torch.autograd.grad(xo, xb, dxa[k].to(xo.dtype))
            else:
                dxb = dxa[k]
            dX[k].index_add_(0, plans[k][n].indices.to(dev), dxb.to(dt))
    out = []
    for k in range(K):
        if not (math.isfinite(losses[k]) and torch.isfinite(dX[k]).all() and torch.isfinite(dlog[k])):
            raise DivergedError("non-finite loss/gradient in trajectory matching (diverged: lower lr_img/lr_lr or "
                                 "the initial lr); the last good synthetic set is kept")
        out.append(MetaGrad(losses[k], dX[k], dlog[k], None, theta[k].detach(), dists[k]))
    return out




def apply_meta_gradient(d: Distiller, res: MetaGrad) -> IterationLog:
    """The update half of an MTT iteration for a precomputed meta-gradient: :meth:`Distiller.apply`."""
    return d.apply(res)


def batched_step(distillers: Sequence[Distiller]) -> list[IterationLog | FedLatentError]:
    """One MTT iteration of several distillers (same model, set size and config) as one batched computation.

    Returns, per distiller, its :class:`IterationLog` or the FedLatentError that stopped it (non-finite).
    """
    d0 = distillers[0]
    seg = [d.sampler(d.it) for d in distillers]
    imgs = [d.synthetic.render() for d in distillers]
    ref = imgs[0]
    plans = [make_plan(im.shape[0], d.config.syn_steps, d.batch_syn, derive_seed(d.config.seed, "mtt-iter", d.it),
                       augment=d.augment is not None) for d, im in zip(distillers, imgs)]
    try:
        res = batched_meta_gradient(
            d0.flat, torch.stack([s[0].to(ref) for s in seg]), torch.stack([s[1].to(ref) for s in seg]),
            torch.stack(imgs), torch.stack([d.labels.detach() for d in distillers]),
            torch.stack([d.log_lr.detach().reshape(()) for d in distillers]), plans, d0.augment, d0.config.engine)
    except FedLatentError as e:
        if not is_diverged(e):
            raise
        if len(distillers) == 1:
            return [e]
        # one problem diverged: find it by running them one by one (rare)
        return [r for d in distillers for r in batched_step([d])]
    out: list[IterationLog | FedLatentError] = []
    for d, r in zip(distillers, res):
        try:
            out.append(d.apply(r))
        except FedLatentError as e:
            out.append(e)
    return out


def client_bytes(flat: FlatModel, num_images: int, batch_syn: int, syn_steps: int, image_shape: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes of one client in a batched exact-mode MTT iteration.

    ``(2 syn_steps + 1) P`` for the stored student parameters theta_n and gradients g_n (plus v, u),
    ``3 N C H W`` for images, their gradient and the augmented batch, and the activations of one student step
    kept for the double backward: ``24 batch_syn sum_l(width_l H_l W_l)`` (forward maps, their gradients and
    the tangents of both, measured on the ConvNet; a conservative constant for other architectures).
    """
    es = torch.tensor([], dtype=dtype).element_size()
    act = 0
    hooks = []

    def hook(_m, _i, out):
        nonlocal act
        if isinstance(out, torch.Tensor):
            act += out[0].numel()

    for m in flat.model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            p = next(flat.model.parameters())
            flat.model(torch.zeros((1, *image_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    n_img = num_images * int(np.prod(image_shape))
    return int(es * ((2 * syn_steps + 4) * flat.numel + 3 * n_img + 24 * batch_syn * act))


def available_bytes(device: str | torch.device) -> int:
    """Free memory for the batch: half of the free CUDA memory, or a quarter of MemAvailable on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.5)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 << 30


def choose_batch(num_clients: int, per_client: int, budget: int, max_batch: int | None = None) -> int:
    """Clients per batch: ``floor(budget / per_client)`` clipped to ``[1, num_clients]`` (and ``max_batch``)."""
    b = max(1, min(num_clients, budget // max(1, per_client)))
    return min(b, max_batch) if max_batch else b



def _distiller_bytes(d: Distiller) -> int:
    """:func:`client_bytes` of one distiller's MTT iteration (its model, set and config)."""
    img = d.synthetic.render()
    return client_bytes(d.flat, img.shape[0], d.batch_syn, d.config.syn_steps, img.shape[1:], img.dtype)


@dataclass
class ClientRun:
    """The outcome of one client's distillation."""

    client_id: int
    losses: list[float] = field(default_factory=list)
    lr: float = math.nan
    failure: str | None = None



def concurrent_workers(num_clients: int, device: str | torch.device = "cpu") -> int:
    """Clients distilled at once by ``batched="threads"``: one per intra-op thread torch has
    (``torch.get_num_threads()``), at most ``num_clients``; 1 off the CPU (a GPU stream is already parallel)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(int(num_clients), torch.get_num_threads()))


def _run_one(d: Distiller, r: ClientRun, iterations: int, progress: bool, desc: str,
             callback: Callable | None = None) -> None:
    done = len(d.history)
    d.run(iterations, progress, callback, desc=f"{desc} client {r.client_id}",
          postfix=lambda st: {"loss": f"{st.loss:.4f}"}, stop_on_divergence=True)
    r.losses.extend(float(h.loss) for h in d.history[done:])
    r.failure = d.failure
    r.lr = d.lr


def _run_concurrently(distillers: Sequence[Distiller], runs: list[ClientRun], iterations: int, workers: int,
                      progress: bool, desc: str) -> None:
    """The looped computation, ``workers`` clients at a time in threads that share the intra-op threads
    (``torch.get_num_threads() // workers`` each; the operators release the GIL). Each client is the same
    sequence of operations as in the loop, on its own seeded plans, so the sets do not depend on the order or
    the number of workers; with one intra-op thread per worker they are bitwise those of a one-thread loop.

    Why threads and not a grouped network on a CPU: batching the clients into one computation is slower there in
    every phase that costs (``benchmarks/batching_gain.py``); clients side by side are the other way to use the
    cores. On the 2-core machines of ``benchmarks/RESULTS.md`` ("Server throughput") they measured 0.86-0.98x the
    loop's time on two intra-op threads (small operators scale worse over intra-op threads than whole clients do
    over worker threads), so FedDGM's 'auto' runs them on a CPU.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    per = max(1, threads // workers)
    lock, ready = threading.Lock(), threading.Barrier(workers)
    bar = tqdm(total=len(distillers) * iterations, desc=f"{desc} ({workers} clients at a time)",
               disable=not progress, leave=False, dynamic_ncols=True)

    def start() -> None:  # every worker sets its own thread count (per thread in OpenMP) before any starts work
        torch.set_num_threads(per)
        ready.wait()

    def tick(log: IterationLog) -> None:
        with lock:
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.4f}")

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="fedlatent-distil", initializer=start) as ex:
            jobs = [ex.submit(_run_one, d, r, iterations, False, desc, tick) for d, r in zip(distillers, runs)]
            for f in jobs:
                f.result()  # re-raises a worker's error here
    finally:
        bar.close()
        torch.set_num_threads(threads)  # torch also keeps the last setting globally: restore the caller's


def distill_clients(distillers: Sequence[Distiller], client_ids: Sequence[int], iterations: int, *,
                    batched: bool | str, max_batch: int | None = None, device: str | torch.device = "cpu",
                    progress: bool = True, desc: str = "distil") -> tuple[list[ClientRun], int]:
    """Run ``iterations`` MTT iterations for every distiller; returns (runs, clients computed at once).

    ``batched``: False -- looped, client after client (``Distiller.run``). ``"threads"`` -- the same loop,
    :func:`concurrent_workers` clients at a time in threads (:func:`_run_concurrently`; the CPU's batched
    mode; at most ``max_batch`` and as many as memory allows, :func:`choose_batch`). True or ``"grouped"`` -- groups
    of ``batch`` clients (:func:`choose_batch` from :func:`client_bytes` and :func:`available_bytes`, at most
    ``max_batch``) as one computation, one :func:`batched_step` per
    iteration. A client whose set diverges (a non-finite update is undone by the engine; latents that render to
    NaN/inf images are caught at the next iteration) stops and the others go on, in every mode; the caller drops
    sets whose images are not finite.
    """
    if batched not in (True, False, "grouped", "threads"):
        raise FedLatentError(f"batched must be True, False, 'grouped' or 'threads', got {batched!r}")
    runs = [ClientRun(int(c)) for c in client_ids]
    if not distillers:
        return runs, 0
    if batched == "threads":
        workers = concurrent_workers(len(distillers), device)
        if workers > 1:
            workers = choose_batch(workers, _distiller_bytes(distillers[0]), available_bytes(device), max_batch)
        if workers > 1:
            _run_concurrently(distillers, runs, iterations, workers, progress, desc)
            return runs, workers
        batched = False
    if not batched:
        for d, r in zip(distillers, runs):
            _run_one(d, r, iterations, progress, desc)
        return runs, 1
    bsz = choose_batch(len(distillers), _distiller_bytes(distillers[0]), available_bytes(device), max_batch)
    for g0 in range(0, len(distillers), bsz):
        group = list(range(g0, min(len(distillers), g0 + bsz)))
        ids = " ".join(str(runs[i].client_id) for i in group)
        bar = tqdm(range(iterations), desc=f"{desc} clients {ids}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for _ in bar:
            active = [i for i in group if runs[i].failure is None]
            if not active:
                break
            for i, st in zip(active, batched_step([distillers[i] for i in active])):
                if isinstance(st, FedLatentError):
                    runs[i].failure = f"iteration {distillers[i].it}: {st}"
                else:
                    runs[i].losses.append(float(st.loss))
            done = [runs[i].losses[-1] for i in active if runs[i].losses]
            if done:
                bar.set_postfix(loss=f"{np.mean(done):.4f}")
        bar.close()
    for d, r in zip(distillers, runs):
        r.lr = d.lr
    return runs, bsz



__all__ = ["batched_meta_gradient", "batched_step", "apply_meta_gradient", "client_bytes", "available_bytes",
           "choose_batch", "ClientRun", "concurrent_workers", "distill_clients"]
