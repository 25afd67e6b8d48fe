"""FedDGM (Jia et al., arXiv 2312.01537; reference FedDG23/FedDG-main): federated learning through
server-side *latent* trajectory matching (ALGORITHMS.md §2, §4).

One round:

1. **Clients.** Every selected client receives the global *surrogate* (a ConvNet, flat parameter vector
   ``params``), trains ``local_epochs`` of SGD on its data (FLConfig ``lr`` / ``momentum`` / ``weight_decay``;
   reference: lr 0.01, no momentum) and uploads its start and end parameters ``{"start", "end"}`` only. The
   uploads go through the engine's screening (:func:`fedlatent.fl.validate.validate_uploads`); the server
   additionally drops an upload whose ``start`` is not what it sent.
2. **Server distillation, per client.** ``ipc`` latents per class for *all* classes are initialised from the
   generator (``z ~ N(0, I)``, ``w = mapping(z, c)``, f_k rendered from w; pixel space: N(0, 1) noise), so no
   client data ever reaches the server. Latent MTT (MTT eqs. 1-2 through the generator, GLaD) then matches the
   one-segment trajectory ``start -> end`` of that client: the student starts at ``start``, takes ``syn_steps``
   SGD steps (learnable lr) on the DSA-augmented rendered images, and the latents move to minimise
   ``||theta_N - end||^2 / ||start - end||^2``. This is :class:`fedlatent.distill.distiller.Distiller` with a
   :class:`fedlatent.generators.LatentSet` (chunked renderer) or a :class:`fedlatent.synthetic.PixelSet`, and
   the exact constant-memory meta-gradient (the reference uses TESLA's approximate backward).
3. **Pool and train.** The rendered sets of all clients are pooled (this round's only, as the reference; or
   every round's with ``pool="all"``); the global model (any registry architecture, ``FLConfig.model``) and -
   when it is another architecture - the surrogate are trained on the pool for ``train_epochs`` epochs (SGD,
   DSA). There is no weight averaging: the surrogate trained on the pool is the next round's download.

Which classes per client: all of them (the reference's ``prepare_latents`` is called without the client).
Distilling only the classes a client holds would need the client to reveal which labels it has; the server
otherwise sees parameters only, so this is deliberately not offered.

**Batched distillation** (:func:`batched_meta_gradient`): several clients' MTT iterations run as one
vectorised computation - ``torch.func.vmap`` over the clients of the per-step gradient and of the second-order
product ``(H u, (dg/dx)^T u)`` (functorch turns a batch of per-client weights into grouped convolutions), with
per-client step sizes, plans and augmentations. Everything around the meta-gradient (rendering, latent
backward, optimisers) stays per client, with the same objects the looped path uses, so the two paths compute
the same numbers up to floating-point reassociation (checked in float64 to 1e-10 in the tests; bitwise
equality is impossible because a grouped convolution sums in another order than the hand-written ConvNet
kernel the loop uses). The number of clients per batch comes from memory (:func:`client_bytes`). On CPU the
hand-written per-client kernel is faster than vmap (see ``benchmarks/feddgm.py --batched/--looped``), so
``batched="auto"`` batches on CUDA only.

:func:`distill_federated` is the Python API behind ``fedlatent distill`` (presets, generator public split,
run folder with report.md, checkpoints, resume).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distill.augment import DEFAULT_STRATEGY, DSA, parse_strategy
from ..distill.distiller import DistillConfig, Distiller, IterationLog
from ..distill.mtt import MetaGrad, make_plan, trajectory_loss, validate_inputs
from ..distill.pixels import fit_on_set
from ..models.functional import FlatModel
from ..utils import FedLatentError, atomic_write, derive_seed, sha256_file, torch_generator
from .base import ClientData, FLContext, Strategy, TensorDict, Upload, UploadSpec, register_method
from .client import client_model, local_train

log = logging.getLogger("fedlatent.fl.feddgm")

DISTILLED_FILE = "distilled.safetensors"
GRID_PATTERN = "grid_round{r}.png"
REPORT_FILE = "report.md"


# =============================================================================================
# Batched multi-client meta-gradient


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
                          plans: Sequence[Sequence], augment: Callable | None) -> list[MetaGrad]:
    """MTT meta-gradients (exact mode) of ``K`` independent problems in one vectorised pass.

    ``theta_start`` / ``theta_target`` ``[K, P]``, ``images`` ``[K, N, C, H, W]``, ``labels`` int ``[K, N]``,
    ``log_lr`` ``[K]``, ``plans[k]`` the step plan of problem ``k`` (all of the same length). Problem ``k`` gets
    exactly what :func:`fedlatent.distill.mtt.meta_gradient` computes for it alone (MTT eqs. 1-2 and the adjoint
    recursion ``v_n = v_{n+1} + H_n u``, ``u = -alpha_k v_{n+1}``, ``dX += (dg_n/dX)^T u``,
    ``d log_lr += g_n . u``): the per-step gradients and second-order products are ``vmap``-ed over ``k``;
    minibatches and augmentation stay per problem.
    """
    from torch.func import vmap

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
            raise FedLatentError("non-finite student loss/gradient in trajectory matching (diverged: lower lr_img/"
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
            raise FedLatentError("non-finite loss/gradient in trajectory matching (diverged: lower lr_img/lr_lr or "
                                 "the initial lr); the last good synthetic set is kept")
        out.append(MetaGrad(losses[k], dX[k], dlog[k], None, theta[k].detach(), dists[k]))
    return out


def diverged(e: Exception) -> bool:
    """Whether a FedLatentError of the MTT engine means "this synthetic set diverged" (NaN/inf somewhere)."""
    msg = str(e)
    return isinstance(e, FedLatentError) and ("non-finite" in msg or "NaN/inf" in msg)


def apply_meta_gradient(d: Distiller, res: MetaGrad) -> IterationLog:
    """The update half of :meth:`Distiller.step` for a precomputed meta-gradient (the batched path).

    Same order and optimisers as the engine: zero grads, ``synthetic.backward(dX)``, ``d log_lr``, optimiser
    steps; a non-finite result restores the previous set/lr/optimiser state and raises FedLatentError.
    """
    params = d._params()
    opts = d._optimizers()
    saved = [p.detach().clone() for p in params]
    states = [{k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in o.state.items()}
              for o in opts]
    for o in opts:
        o.zero_grad(set_to_none=True)
    d.synthetic.backward(res.grad_images)
    d.log_lr.grad = res.grad_log_lr.reshape(()).to(d.log_lr)
    for o in opts:
        o.step()
    if not all(torch.isfinite(p).all() for p in params):
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for o, st in zip(opts, states):
            o.state.clear()
            o.state.update(st)
        raise FedLatentError(f"iteration {d.it}: the update made the synthetic set non-finite (lower lr_img); "
                             "restored the last good set")
    entry = IterationLog(d.it, res.loss, d.lr, res.param_dist)
    d.history.append(entry)
    d.it += 1
    return entry


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
            torch.stack([d.log_lr.detach().reshape(()) for d in distillers]), plans, d0.augment)
    except FedLatentError as e:
        if not diverged(e):
            raise
        if len(distillers) == 1:
            return [e]
        # one problem diverged: find it by running them one by one (rare)
        return [r for d in distillers for r in batched_step([d])]
    out: list[IterationLog | FedLatentError] = []
    for d, r in zip(distillers, res):
        try:
            out.append(apply_meta_gradient(d, r))
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


@dataclass
class ClientRun:
    """The outcome of one client's distillation."""

    client_id: int
    losses: list[float] = field(default_factory=list)
    lr: float = math.nan
    failure: str | None = None


@dataclass
class DistilledSet:
    """One client's distilled set as the server pools it (rendered images on the CPU, float32) - also what a
    parallel worker returns for :meth:`FedDGM.distill_client`. ``images`` is None when the work failed."""

    run: ClientRun
    images: torch.Tensor | None
    labels: torch.Tensor | None
    ws: torch.Tensor | None = None
    f_k: torch.Tensor | None = None


def harvest(d: Distiller, run: ClientRun, pixel: bool) -> DistilledSet:
    """Render a finished distiller's set (and, in a latent space, keep its w+ codes and f_k features)."""
    syn = d.synthetic
    x = syn.render().detach().float()
    ws = f_k = None
    if not pixel:
        fw = syn.full_ws()
        ws = None if fw is None else fw.detach().float().cpu()
        f_k = None if syn.f is None else syn.f.detach().float().cpu()
    return DistilledSet(run, x.cpu(), d.labels.detach().long().cpu(), ws, f_k)


def distill_clients(distillers: Sequence[Distiller], client_ids: Sequence[int], iterations: int, *,
                    batched: bool, max_batch: int | None = None, device: str | torch.device = "cpu",
                    progress: bool = True, desc: str = "distil") -> tuple[list[ClientRun], int]:
    """Run ``iterations`` MTT iterations for every distiller, looped or batched; returns (runs, batch size).

    Looped: client after client, ``Distiller.step``. Batched: groups of ``batch`` clients
    (:func:`choose_batch` from :func:`client_bytes` and :func:`available_bytes`, at most ``max_batch``), one
    :func:`batched_step` per iteration. A client whose set diverges (a non-finite update is undone by the engine;
    latents that render to NaN/inf images are caught at the next iteration) stops and the others go on, in both
    modes; the caller drops sets whose images are not finite.
    """
    runs = [ClientRun(int(c)) for c in client_ids]
    if not distillers:
        return runs, 0
    if not batched:
        for d, r in zip(distillers, runs):
            bar = tqdm(range(iterations), desc=f"{desc} client {r.client_id}", disable=not progress, leave=False,
                       dynamic_ncols=True)
            for _ in bar:
                try:
                    st = d.step()
                except FedLatentError as e:
                    if not diverged(e):
                        raise
                    r.failure = f"iteration {d.it}: {e}"
                    break
                r.losses.append(float(st.loss))
                bar.set_postfix(loss=f"{st.loss:.4f}")
            bar.close()
            r.lr = d.lr
        return runs, 1
    d0 = distillers[0]
    img = d0.synthetic.render()
    per = client_bytes(d0.flat, img.shape[0], d0.batch_syn, d0.config.syn_steps, img.shape[1:], img.dtype)
    bsz = choose_batch(len(distillers), per, available_bytes(device), max_batch)
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


# =============================================================================================
# Server training on the pool, grids


def train_on_pool(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                  momentum: float, weight_decay: float, batch_size: int, augment: Callable | None,
                  generator: torch.Generator) -> float:
    """Continue training ``model`` on the pooled distilled set: ``epochs`` shuffled passes of SGD with
    cross-entropy on DSA-augmented minibatches (reference ``epoch_global``). Returns the mean minibatch loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return fit_on_set(model, images, labels, opt, epochs=epochs, batch_size=batch_size, augment=augment,
                      generator=generator)


def save_class_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, clients: torch.Tensor | None,
                    mean: Sequence[float], std: Sequence[float], class_names: Sequence[str], title: str = "",
                    max_cols: int = 40) -> None:
    """PNG: one row per class with that class's distilled images (de-normalised), ordered by client."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data import denormalize

    x = denormalize(images.detach().float().cpu(), mean, std)
    labels = labels.detach().cpu()
    clients = clients.detach().cpu() if clients is not None else torch.zeros_like(labels)
    k = len(class_names)
    rows = []
    for c in range(k):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.argsort(clients[idx], stable=True)][:max_cols]
        rows.append(idx)
    cols = max(1, max(len(r) for r in rows))
    C, H, W = x.shape[1:]
    pad = 1
    canvas = torch.ones(C, k * (H + pad) + pad, cols * (W + pad) + pad)
    for r, idx in enumerate(rows):
        for j, i in enumerate(idx.tolist()):
            top, left = pad + r * (H + pad), pad + j * (W + pad)
            canvas[:, top:top + H, left:left + W] = x[i]
    fig = Figure(figsize=(min(16.0, 1.5 + 0.35 * cols), 0.5 + 0.38 * k), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    img = canvas[0].numpy() if C == 1 else canvas.permute(1, 2, 0).numpy()
    ax.imshow(img, cmap="gray" if C == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * (H + pad) + H / 2 for r in range(k)])
    ax.set_yticklabels([str(n) for n in class_names], fontsize=7)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


# =============================================================================================
# Generators


def generator_identity(name: str | None) -> tuple[str, str | None, dict | None]:
    """(name, sha256, manifest entry or None) of a manifest name or checkpoint path."""
    from ..generators.registry import entry_path, read_manifest

    if name is None:
        return "", None, None
    m = read_manifest()
    if name in m["models"]:
        entry = m["models"][name]
        sha = entry.get("sha256")
        p = entry_path(name, entry)
        if not sha and p.is_file():
            sha = sha256_file(p)
        return name, sha, entry
    p = Path(name).expanduser()
    return name, (sha256_file(p) if p.is_file() else None), None


def default_generator(dataset: str) -> str | None:
    """The manifest generator for ``dataset``: a built-in checkpoint present on disk first, then a
    downloaded StyleGAN-XL pickle; None when there is none (use ``space="pixel"`` or name one)."""
    from ..generators.registry import entry_path, read_manifest

    models = read_manifest()["models"]
    for kind in ("builtin", "stylegan-xl"):
        for name, e in models.items():
            if e.get("kind") == kind and e.get("dataset") == dataset and entry_path(name, e).is_file():
                return name
    return None


def default_space(generator) -> str:
    """F5 for StyleGAN-XL (FedDGM's CIFAR-10 layer); for other generators F_{L // 3} (L = number of layers)."""
    from ..generators.builtin import BuiltinStyleGenerator

    if isinstance(getattr(generator, "G", None), BuiltinStyleGenerator):
        return f"F{max(0, generator.num_layers // 3)}"
    return f"F{min(5, generator.num_layers)}"


_WORKER_GENERATORS: dict[tuple[str, str], Any] = {}


def worker_generator(name: str, device: str, sha256: str | None = None):
    """The generator ``name`` on ``device``, loaded once per process (a parallel worker's cache, see
    :meth:`FedDGM.worker_view`); FedLatentError when the file here is not the one the run recorded (``sha256``)."""
    from ..generators import load_generator

    key = (str(name), str(device))
    if key not in _WORKER_GENERATORS:
        if sha256:
            here = generator_identity(name)[1]
            if here != sha256:
                raise FedLatentError(f"generator {name!r} on this worker (sha256 {here}) is not the run's "
                                     f"(sha256 {sha256}); install the same checkpoint on every node")
        _WORKER_GENERATORS[key] = load_generator(name, device=device)
    return _WORKER_GENERATORS[key]


# =============================================================================================
# The strategy


@dataclass
class Pool:
    """The pooled distilled set (server side) with provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    clients: torch.Tensor
    rounds: torch.Tensor
    ws: torch.Tensor | None = None
    f_k: torch.Tensor | None = None

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_state(cls, st: Mapping[str, Any] | None) -> "Pool | None":
        return None if not st else cls(**{k: v.clone() for k, v in st.items()})

    @staticmethod
    def cat(pools: Sequence["Pool"]) -> "Pool":
        def c(name):
            ts = [getattr(p, name) for p in pools]
            return None if any(t is None for t in ts) else torch.cat(ts)

        return Pool(c("images"), c("labels"), c("clients"), c("rounds"), c("ws"), c("f_k"))


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise FedLatentError(f"feddgm: {name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _num(name: str, v: Any, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise FedLatentError(f"feddgm: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


@register_method("feddgm")
class FedDGM(Strategy):
    """FedDGM: client trajectories -> server latent MTT per client -> train on the pooled distilled sets.

    Defaults follow the reference (FedDG23/FedDG-main, CIFAR-10 README command) where it has one; the CPU
    configuration of ``fedlatent distill`` overrides them (see :data:`PRESETS`).

    Distillation: ``generator`` (manifest name or checkpoint; None = the dataset's default), ``space`` (``F<k>``,
    ``W+``, ``pixel``; None = :func:`default_space`), ``ipc`` 10, ``iterations`` 100, ``syn_steps`` 20,
    ``lr_img`` 1000 (f_k / pixels), ``lr_w`` 1, ``lr_lr`` 1e-5 (reference units: SGD step on the lr itself; the
    engine learns log lr with ``lr_lr / lr_teacher**2``), ``lr_teacher`` 0.01, ``momentum`` 0.5, ``batch_syn``
    None (whole set), ``init`` "random" (or "mean_w"), ``dsa`` / ``dsa_strategy`` (reference DSA), ``mtt_mode``
    "exact", ``chunk_size`` 64 (renderer).
    Surrogate and server training: ``surrogate`` "convnet" (any ConvNet spec, e.g. ``convnet:width=32``; the
    global model is FLConfig ``model``), ``train_epochs`` 1000 (reference ``inner_loop``), ``train_lr`` 0.01,
    ``train_momentum`` 0.9, ``train_weight_decay`` 5e-4, ``train_batch`` 256, ``train_dsa`` True,
    ``pool`` "round" | "all".
    Execution: ``batched`` True | False | "auto" (CUDA only), ``max_batch`` (clients per batch cap),
    ``progress``, ``save_artifacts`` (grids and distilled.safetensors in the run folder), ``classes`` "all",
    ``dataset`` (its name: picks the default generator and goes into the export metadata).

    ``distill_map`` (not an option; set by :meth:`fedlatent.parallel.RayBackend.attach`): a client runner
    ``(fn, jobs) -> [fn(*job) ...]``; when set, the looped per-client distillation runs through it, one
    :meth:`distill_client` job per client (the batched path ignores it). What a parallel runner ships to its
    workers is :meth:`worker_view`.
    """

    distill_map: Callable[[Callable, Sequence[tuple]], list] | None = None

    def __init__(self, generator: str | None = None, space: str | None = None, ipc: int = 10, iterations: int = 100,
                 syn_steps: int = 20, lr_img: float = 1000.0, lr_w: float = 1.0, lr_lr: float = 1e-5,
                 lr_teacher: float = 0.01, momentum: float = 0.5, batch_syn: int | None = None, init: str = "random",
                 dsa: bool = True, dsa_strategy: str = DEFAULT_STRATEGY, mtt_mode: str = "exact",
                 chunk_size: int = 64, surrogate: str = "convnet", train_epochs: int = 1000, train_lr: float = 0.01,
                 train_momentum: float = 0.9, train_weight_decay: float = 5e-4, train_batch: int = 256,
                 train_dsa: bool = True, pool: str = "round", batched: bool | str = "auto",
                 max_batch: int | None = None, classes: str = "all", dataset: str | None = None,
                 progress: bool = True, save_artifacts: bool = True):
        from ..generators.latent import PIXEL, parse_space

        self.generator_name = None if generator in (None, "", "none") else str(generator)
        self.space = None if space in (None, "", "auto") else str(space)
        if self.space is not None:
            parse_space(self.space)
        self.ipc = _int("ipc", ipc, 1)
        self.iterations = _int("iterations", iterations, 0)
        self.syn_steps = _int("syn_steps", syn_steps, 1)
        self.lr_img, self.lr_w, self.lr_lr = _num("lr_img", lr_img), _num("lr_w", lr_w), _num("lr_lr", lr_lr)
        self.lr_teacher = _num("lr_teacher", lr_teacher, positive=True)
        self.momentum = _num("momentum", momentum)
        self.batch_syn = None if batch_syn is None else _int("batch_syn", batch_syn, 1)
        if init not in ("random", "mean_w"):
            raise FedLatentError(f"feddgm: init must be 'random' or 'mean_w', got {init!r}")
        self.init = init
        self.dsa, self.dsa_strategy = bool(dsa), str(dsa_strategy)
        parse_strategy(self.dsa_strategy)
        if mtt_mode not in ("exact", "unrolled"):
            raise FedLatentError(f"feddgm: mtt_mode must be 'exact' or 'unrolled', got {mtt_mode!r}")
        self.mtt_mode = mtt_mode
        self.chunk_size = _int("chunk_size", chunk_size, 1)
        self.surrogate_spec = str(surrogate)
        self.train_epochs = _int("train_epochs", train_epochs, 0)
        self.train_lr, self.train_momentum = _num("train_lr", train_lr), _num("train_momentum", train_momentum)
        self.train_weight_decay = _num("train_weight_decay", train_weight_decay)
        self.train_batch = _int("train_batch", train_batch, 1)
        self.train_dsa = bool(train_dsa)
        if pool not in ("round", "all"):
            raise FedLatentError(f"feddgm: pool must be 'round' or 'all', got {pool!r}")
        self.pool_mode = pool
        if batched not in (True, False, "auto"):
            raise FedLatentError(f"feddgm: batched must be true, false or 'auto', got {batched!r}")
        self.batched = batched
        self.max_batch = None if max_batch is None else _int("max_batch", max_batch, 1)
        if classes != "all":
            raise FedLatentError("feddgm: classes must be 'all' (the server cannot know which classes a client "
                                 "holds without the client disclosing its labels)")
        self.classes = classes
        self.dataset = None if dataset is None else str(dataset)
        self.progress, self.save_artifacts = bool(progress), bool(save_artifacts)
        self._pixel = self.space is not None and parse_space(self.space) == PIXEL
        self.pool: Pool | None = None
        self.round_log: list[dict[str, Any]] = []

    def options(self) -> dict[str, Any]:
        return {"generator": self.generator_name, "space": self.space, "ipc": self.ipc, "iterations": self.iterations,
                "syn_steps": self.syn_steps, "lr_img": self.lr_img, "lr_w": self.lr_w, "lr_lr": self.lr_lr,
                "lr_teacher": self.lr_teacher, "momentum": self.momentum, "batch_syn": self.batch_syn,
                "init": self.init, "dsa": self.dsa, "dsa_strategy": self.dsa_strategy, "mtt_mode": self.mtt_mode,
                "chunk_size": self.chunk_size, "surrogate": self.surrogate_spec, "train_epochs": self.train_epochs,
                "train_lr": self.train_lr, "train_momentum": self.train_momentum,
                "train_weight_decay": self.train_weight_decay, "train_batch": self.train_batch,
                "train_dsa": self.train_dsa, "pool": self.pool_mode, "batched": self.batched,
                "max_batch": self.max_batch, "classes": self.classes, "dataset": self.dataset}

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, ctx: FLContext) -> None:
        from ..generators import load_generator
        from ..generators.latent import PIXEL, parse_space

        super().setup(ctx)
        self.G = None
        if not self._pixel:
            name = self.generator_name
            if name is None:
                name = default_generator(self.dataset or "")
            if name is None:
                raise FedLatentError("feddgm: no generator given and none is known for this dataset; pass "
                                     "generator=NAME|PATH (fedlatent pretrained list) or space='pixel'")
            self.G = load_generator(name, device=ctx.device)
            self._g_source = (name, self.G)  # worker_view ships this G by name (a worker loads it itself)
            self.generator_name = name
            if self.space is None:
                self.space = default_space(self.G)
            if parse_space(self.space) == PIXEL:
                self._pixel, self.G = True, None
            else:
                if self.G.img_channels != ctx.channels:
                    raise FedLatentError(f"feddgm: generator {name!r} makes {self.G.img_channels}-channel images, the "
                                         f"dataset has {ctx.channels}")
                if self.G.c_dim and self.G.c_dim < ctx.num_classes:
                    raise FedLatentError(f"feddgm: generator {name!r} knows {self.G.c_dim} classes, the dataset has "
                                         f"{ctx.num_classes}")
                self.G.check_k(parse_space(self.space))
        if self._pixel:
            self.space = "pixel"
        self.generator_sha256 = generator_identity(self.generator_name)[1] if self.G is not None else None
        self.model = ctx.build_model()
        if self.surrogate_spec == ctx.config.model:
            self.surrogate = self.model
        else:
            self.surrogate = ctx.build_model(self.surrogate_spec, key="feddgm-surrogate")
        if any(True for _ in self.surrogate.buffers()):
            raise FedLatentError(f"feddgm: the surrogate {self.surrogate_spec!r} has buffers (e.g. batch norm); "
                                 "trajectory matching needs a buffer-free student such as the instance-norm ConvNet")
        self.flat = FlatModel(self.surrogate)
        self._sent: tuple[int, torch.Tensor] | None = None
        self.pool, self.round_log = None, []

    # -- engine hooks ----------------------------------------------------------------------------------
    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        if self._sent is None or self._sent[0] != rnd:
            self._sent = (rnd, self.flat.flatten())
        return {"params": self._sent[1]}

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict, data: ClientData) -> Upload:
        cfg = ctx.config
        model = client_model(ctx, self.surrogate_spec)
        flat = FlatModel(model)
        start = payload["params"].detach()
        flat.load(start)
        metrics = local_train(model, data.x, data.y, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              generator=torch_generator(cfg.seed, "client", rnd, data.client_id))
        return Upload(client_id=data.client_id, tensors={"start": start.clone(), "end": flat.flatten()},
                      num_samples=len(data), metrics=metrics)

    def expected_upload(self, client_id: int) -> UploadSpec:
        p = next(self.surrogate.parameters())
        return {"start": ((self.flat.numel,), p.dtype), "end": ((self.flat.numel,), p.dtype)}

    def eval_model(self) -> nn.Module:
        return self.model

    # -- the server ------------------------------------------------------------------------------------
    def _synthetic(self, seed: int):
        """A fresh synthetic set for one client: latents for all classes (or pixel noise) and the labels."""
        from ..generators.latent import LatentSet
        from ..synthetic import PixelSet

        ctx = self.ctx
        labels = torch.arange(ctx.num_classes).repeat_interleave(self.ipc).to(ctx.device)
        if self._pixel:
            g = torch_generator(seed, "init", "pixel")
            x = torch.randn(len(labels), ctx.channels, ctx.image_size, ctx.image_size, generator=g)
            syn = PixelSet(x.to(ctx.device))
            return syn, labels, torch.optim.SGD(syn.parameters(), lr=self.lr_img, momentum=self.momentum)
        ls = LatentSet.initialize(self.G, self.space, self.ipc, num_classes=ctx.num_classes, seed=seed, init=self.init,
                                  mean=ctx.mean, std=ctx.std, chunk_size=self.chunk_size, image_size=ctx.image_size)
        return ls, labels, torch.optim.SGD(ls.param_groups(self.lr_w, self.lr_img, self.momentum), lr=self.lr_w)

    def make_distillers(self, rnd: int, uploads: Sequence[Upload]) -> list[Distiller]:
        """One engine Distiller per upload: start -> end segment, fresh latents, seeds (seed, round, client)."""
        ctx = self.ctx
        out = []
        for u in uploads:
            seed = derive_seed(ctx.config.seed, "feddgm", rnd, u.client_id)
            start = u.tensors["start"].detach().to(ctx.device)
            end = u.tensors["end"].detach().to(ctx.device)
            syn, labels, opt = self._synthetic(derive_seed(seed, "latents"))
            cfg = DistillConfig(syn_steps=self.syn_steps, expert_epochs=1, max_start_epoch=1, batch_syn=self.batch_syn,
                                lr_img=self.lr_img, lr_lr=self.lr_lr / self.lr_teacher ** 2, lr_label=0.0,
                                lr_teacher=self.lr_teacher, momentum=self.momentum, mode=self.mtt_mode,
                                dsa=self.dsa and bool(parse_strategy(self.dsa_strategy)), dsa_strategy=self.dsa_strategy,
                                dsa_siamese=False, seed=derive_seed(seed, "mtt"))
            out.append(Distiller(self.surrogate, syn, labels, (lambda it, s=start, e=end: (s, e)), cfg,
                                 image_optimizer=opt))
        return out

    def _use_batched(self) -> bool:
        if self.batched == "auto":
            return torch.device(self.ctx.device).type == "cuda" and not self.mtt_mode == "unrolled"
        return bool(self.batched)

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        ctx = self.ctx
        sent = self._sent[1] if self._sent is not None else self.flat.flatten()
        good: list[Upload] = []
        mismatch = unchanged = 0
        for u in sorted(uploads, key=lambda u: u.client_id):
            if not torch.equal(u.tensors["start"].to(sent), sent):
                log.warning("round %d: client %d uploaded a start that is not the global surrogate; dropped",
                            rnd, u.client_id)
                mismatch += 1
            elif torch.equal(u.tensors["end"], u.tensors["start"]):
                log.warning("round %d: client %d did not move (end == start); nothing to distil", rnd, u.client_id)
                unchanged += 1
            else:
                good.append(u)
        extra: dict[str, float] = {"start_mismatch": float(mismatch), "unchanged": float(unchanged)}
        if not good:
            log.warning("round %d: no usable client trajectory; the global state is unchanged", rnd)
            return extra
        t0 = time.perf_counter()
        use_batch = self._use_batched() and self.mtt_mode == "exact"
        if self.distill_map is not None and not use_batch:
            sets, bsz = self._distill_mapped(rnd, good), 1
            t_distill = time.perf_counter() - t0
        else:
            distillers = self.make_distillers(rnd, good)
            runs, bsz = distill_clients(distillers, [u.client_id for u in good], self.iterations, batched=use_batch,
                                        max_batch=self.max_batch, device=ctx.device, progress=self.progress,
                                        desc=f"feddgm round {rnd}")
            t_distill = time.perf_counter() - t0
            sets = [harvest(d, r, self._pixel) for d, r in zip(distillers, runs)]
        runs = [st.run for st in sets]
        parts = []
        dropped: set[int] = set()
        for u, st in zip(good, sets):
            if st.images is None:
                log.warning("round %d: the distillation of client %d failed (%s); its set is dropped",
                            rnd, u.client_id, st.run.failure)
                dropped.add(u.client_id)
                continue
            if not torch.isfinite(st.images).all():
                log.warning("round %d: client %d's distilled images are not finite (%s); its set is dropped",
                            rnd, u.client_id, st.run.failure)
                dropped.add(u.client_id)
                continue
            n = st.images.shape[0]
            parts.append(Pool(st.images, st.labels, torch.full((n,), u.client_id, dtype=torch.long),
                              torch.full((n,), rnd, dtype=torch.long), st.ws, st.f_k))
        extra["distill_dropped"] = float(len(dropped))
        if not parts:
            lost = sum(st.images is None for st in sets)
            log.warning("round %d: no usable distilled set (%d diverged%s); the global state is unchanged", rnd,
                        len(sets) - lost, f", {lost} failed" if lost else "")
            return extra
        this_round = Pool.cat(parts)
        self.pool = this_round if self.pool_mode == "round" or self.pool is None else Pool.cat([self.pool, this_round])
        # server training on the pool
        t1 = time.perf_counter()
        aug = DSA(self.dsa_strategy, siamese=False) if self.train_dsa and parse_strategy(self.dsa_strategy) else None
        targets = [("global", self.model)] + ([("surrogate", self.surrogate)] if self.surrogate is not self.model else [])
        train_loss = {}
        for name, m in targets:
            train_loss[name] = train_on_pool(
                m, self.pool.images, self.pool.labels, epochs=self.train_epochs, lr=self.train_lr,
                momentum=self.train_momentum, weight_decay=self.train_weight_decay, batch_size=self.train_batch,
                augment=aug, generator=torch_generator(ctx.config.seed, "feddgm", "train", rnd, name))
        t_train = time.perf_counter() - t1
        final_losses = [r.losses[-1] for r in runs if r.losses]
        first_losses = [r.losses[0] for r in runs if r.losses]
        failures = [r for r in runs if r.failure]
        for r in failures:
            if r.client_id not in dropped:  # a dropped set was logged above
                log.warning("round %d: distillation of client %d stopped at %s; its last good set is used",
                            rnd, r.client_id, r.failure)
        entry = {"round": rnd, "clients": [r.client_id for r in runs], "loss_first": first_losses,
                 "loss_last": final_losses, "lr": [r.lr if math.isfinite(r.lr) else None for r in runs],
                 "failures": [r.failure for r in runs], "batch": bsz}
        self.round_log.append(entry)
        extra.update({
            "distill_loss": float(np.mean(final_losses)) if final_losses else math.nan,
            "distill_loss_first": float(np.mean(first_losses)) if first_losses else math.nan,
            "syn_lr": _finite_mean([r.lr for r in runs]), "distill_failed": float(len(failures)),
            "pool_size": float(len(self.pool.images)), "server_train_loss": train_loss["global"],
            "distill_s": t_distill, "server_train_s": t_train, "distill_batch": float(bsz),
        })
        if "surrogate" in train_loss:
            extra["surrogate_train_loss"] = train_loss["surrogate"]
        if self.save_artifacts and getattr(ctx, "run_dir", None):
            self.save_round(ctx.run_dir, rnd)
        return extra

    def distill_client(self, rnd: int, upload: Upload) -> DistilledSet:
        """The server distillation of one client on its own (a :attr:`distill_map` job): the same distiller,
        seeds and iterations as the loop over all clients, so the same numbers. In a :meth:`worker_view` the
        generator is loaded here, by name, once per process (:func:`worker_generator`)."""
        if self.G is None and getattr(self, "_g_by_name", None) is not None:
            self.G = worker_generator(self._g_by_name, self.ctx.device, self.generator_sha256)
        d = self.make_distillers(rnd, [upload])[0]
        runs, _ = distill_clients([d], [upload.client_id], self.iterations, batched=False, progress=False)
        return harvest(d, runs[0], self._pixel)

    def _distill_mapped(self, rnd: int, good: Sequence[Upload]) -> list[DistilledSet]:
        """Every client's :meth:`distill_client` through :attr:`distill_map`; a job the runner reports as failed
        (a :class:`fedlatent.fl.simulation.ClientFailure`) becomes a set without images (dropped and logged by
        :meth:`aggregate`). When every job failed - errors, not diverged sets - FedLatentError is raised with
        the first error (going on would repeat rounds that change nothing)."""
        out, errors = [], []
        for u, res in zip(good, self.distill_map(self.distill_client, [(rnd, u) for u in good])):
            if isinstance(res, DistilledSet):
                out.append(res)
            else:
                err = getattr(res, "error", None) or repr(res)
                errors.append((u.client_id, err))
                out.append(DistilledSet(ClientRun(u.client_id, failure=f"job failed: {err}"), None, None))
        if errors and len(errors) == len(good):
            cid, err = errors[0]
            raise FedLatentError(f"round {rnd}: every distillation job failed ({len(errors)} of {len(good)}); "
                                 f"first error (client {cid}): {err}")
        return out

    def worker_view(self) -> "FedDGM":
        """What a parallel runner ships to its workers for :meth:`client_update` / :meth:`distill_client`: a
        shallow copy without the pool, the round log, the global model (when it is not the surrogate), the
        flat-parameter helper, the sent payload and the runner hook. The generator goes by name when setup
        loaded it from one (the worker loads it itself, once per process, and checks its sha256 against this
        run's); a generator object set on the strategy otherwise (e.g. ``strategy.G = obj`` in a program) has
        no name to load and is shipped as it is. On a cluster, the name must therefore resolve on every node
        (same manifest entry / checkpoint path)."""
        v = copy.copy(self)
        d = v.__dict__
        d.pop("distill_map", None)
        d.update(pool=None, round_log=[], _sent=None, flat=None)
        if getattr(self, "surrogate", None) is not getattr(self, "model", None):
            d["model"] = None
        src = getattr(self, "_g_source", None)
        d["_g_source"] = None
        if self.__dict__.get("G") is not None and src is not None and src[1] is self.G:
            d["G"], d["_g_by_name"] = None, src[0]
        return v

    # -- artefacts -------------------------------------------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"method": "feddgm", "options": self.options(), "surrogate": self.surrogate_spec,
                "model": ctx.config.model, "clients": ctx.config.clients, "partition": ctx.config.partition,
                "alpha": ctx.config.alpha, "rounds_done": self.round_log[-1]["round"] if self.round_log else 0}

    def save_distilled(self, path: str | os.PathLike, uint8: bool = False) -> Path | None:
        """Write the current pool as a distilled set (:mod:`fedlatent.export`); None when there is no pool."""
        from ..export import save_distilled

        if self.pool is None:
            return None
        ctx = self.ctx
        p = self.pool
        return save_distilled(path, p.images, p.labels, dataset=self.dataset or "",
                              class_names=ctx.class_names, mean=ctx.mean, std=ctx.std,
                              generator=self.generator_name if self.G is not None else None,
                              generator_sha256=self.generator_sha256, latent_space=self.space, ipc=self.ipc,
                              seed=ctx.config.seed, clients=p.clients, rounds=p.rounds,
                              latents={"ws": p.ws, "f_k": p.f_k}, extra=self.export_metadata(), uint8=uint8)

    def save_round(self, folder: str | os.PathLike, rnd: int) -> None:
        folder = Path(folder)
        self.save_distilled(folder / DISTILLED_FILE)
        cur = self.pool
        mask = cur.rounds == rnd
        save_class_grid(folder / GRID_PATTERN.format(r=rnd), cur.images[mask], cur.labels[mask], cur.clients[mask],
                        self.ctx.mean, self.ctx.std, self.ctx.class_names,
                        title=f"FedDGM round {rnd}: distilled images per class ({self.space}; columns ordered by client)")

    # -- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st: dict[str, Any] = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                              "pool": None if self.pool is None else self.pool.state(),
                              "round_log": copy.deepcopy(self.round_log)}
        if self.surrogate is not self.model:
            st["surrogate"] = {k: v.detach().clone() for k, v in self.surrogate.state_dict().items()}
        return st

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.surrogate is not self.model:
            if "surrogate" not in state:
                raise FedLatentError("feddgm: checkpoint has no surrogate state but the run uses a separate surrogate")
            self.surrogate.load_state_dict(state["surrogate"])
        self.pool = Pool.from_state(state.get("pool"))
        self.round_log = list(state.get("round_log") or [])
        self._sent = None


# =============================================================================================
# The Python API behind `fedlatent distill`

#: Documented configurations.
#:
#: "cpu": digits 16 px through the built-in ``digits`` generator (space F2), 5 clients (Dirichlet 0.5, all
#: participate), 3 rounds of 5 local epochs, ConvNet-D3 width 16 as surrogate and global model, ipc 2, 20 MTT
#: iterations of 8 syn_steps per client, 100 server epochs. Measured: about 45 s of CPU time (single thread) for
#: the whole run, final accuracy ~0.92 (seed 0); wall time on a shared, loaded 2-core machine was 130-190 s.
#: lr_img is 100, not the reference's 1000: the built-in generator's f_k are smaller-scale than StyleGAN-XL's and
#: 1000 saturates the images within a few rounds (measured: 0.62 vs 0.92 final accuracy).
#: "paper": the FedDGM reference schedule (10 clients, Dirichlet 0.5, 20 rounds of 20 local epochs, ConvNet-D3
#: width 128, ipc 10, 100 iterations of 20 syn_steps, lr_img 1000, lr_w 1, lr_lr 1e-5, 1000 server epochs) for GPUs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "config": {"clients": 5, "participation": 1.0, "rounds": 3, "local_epochs": 5, "lr": 0.01, "momentum": 0.0,
                   "weight_decay": 0.0, "batch_size": 32, "partition": "dirichlet", "alpha": 0.5,
                   "model": "convnet:width=16"},
        "method": {"ipc": 2, "iterations": 20, "syn_steps": 8, "lr_img": 100.0, "lr_w": 1.0, "lr_lr": 1e-5,
                   "lr_teacher": 0.01, "surrogate": "convnet:width=16", "train_epochs": 100, "train_batch": 256,
                   "dsa_strategy": "color_crop_cutout_scale_rotate"},
    },
    "paper": {
        "config": {"clients": 10, "participation": 1.0, "rounds": 20, "local_epochs": 20, "lr": 0.01, "momentum": 0.0,
                   "weight_decay": 0.0, "batch_size": 256, "partition": "dirichlet", "alpha": 0.5,
                   "model": "convnet-d3:width=128"},
        "method": {"ipc": 10, "iterations": 100, "syn_steps": 20, "lr_img": 1000.0, "lr_w": 1.0, "lr_lr": 1e-5,
                   "lr_teacher": 0.01, "surrogate": "convnet-d3:width=128", "train_epochs": 1000, "train_batch": 256},
    },
}


@dataclass
class DistillResult:
    """Outcome of :func:`distill_federated`."""

    simulation: Any
    out_dir: Path | None
    distilled: Path | None
    report: Path | None
    resumed_from: int | None = None

    @property
    def final_accuracy(self) -> float:
        return self.simulation.final_accuracy

    def line(self) -> str:
        sim = self.simulation
        res = f", resumed after round {self.resumed_from}" if self.resumed_from is not None else ""
        where = f" -> {self.out_dir}" if self.out_dir else ""
        return (f"feddgm: final accuracy {sim.final_accuracy:.4f} (best {sim.best_accuracy:.4f} at round "
                f"{sim.best_round}), {sim.rounds} rounds, {sim.wall_s:.1f} s{res}{where}")


def _split_options(options: Mapping[str, Any]) -> tuple[dict, dict]:
    from .base import FLConfig

    fl_fields = set(FLConfig.__dataclass_fields__)
    import inspect

    method_fields = set(inspect.signature(FedDGM.__init__).parameters) - {"self"}
    cfg, meth = {}, {}
    for k, v in options.items():
        if v is None and k not in ("generator", "space", "batch_syn", "max_batch"):
            continue
        if k in fl_fields:
            cfg[k] = v
        elif k in method_fields:
            meth[k] = v
        else:
            raise FedLatentError(f"unknown distill option {k!r}; valid: {', '.join(sorted(fl_fields | method_fields))}")
    return cfg, meth


def private_training_data(data, generator: str | None):
    """Drop the generator's public split from the training set (the generator never saw client data).

    Applies when the generator's manifest entry records a ``public_split`` for this dataset and size; returns
    ``(data, info)`` with ``info`` describing what was excluded (None when nothing was).
    """
    from ..data import ImageData
    from ..generators.train import private_split_indices

    if generator is None:
        return data, None
    _, _, entry = generator_identity(generator)
    ps = (entry or {}).get("public_split")
    if not ps or entry.get("dataset") != data.name:
        return data, None
    n = int(data.y_train.shape[0])
    if int(ps.get("n_train", -1)) != n:
        log.warning("generator %s was trained on a public split of %s training images; this training set has %d, "
                    "so the split cannot be excluded", generator, ps.get("n_train"), n)
        return data, {"excluded": 0, "reason": "size mismatch"}
    keep = torch.from_numpy(private_split_indices(n, float(ps["fraction"]), int(ps["seed"])))
    out = ImageData(data.name, data.x_train.index_select(0, keep).contiguous(), data.y_train.index_select(0, keep),
                    data.x_test, data.y_test, list(data.classes), data.mean, data.std, data.source, dict(data.extra))
    return out, {"excluded": n - len(keep), "fraction": ps["fraction"], "seed": ps["seed"], "kept": len(keep)}


def distill_federated(dataset: str = "digits", data_root: str | os.PathLike | None = None, preset: str = "cpu",
                      out: str | os.PathLike | None = None, overwrite: bool = False, resume: str | os.PathLike | None = None,
                      image_size: int | None = None, progress: bool = True, checkpoint_every: int = 1,
                      data=None, exclude_public: bool = True, backend: Any = "serial", ray_address: str | None = None,
                      log: str | Sequence[str] | None = None, **options: Any):
    """Run FedDGM end to end and write a run folder; the API behind ``fedlatent distill``.

    ``preset`` ("cpu" | "paper", see :data:`PRESETS`) gives the defaults; ``options`` override them with any
    :class:`~fedlatent.fl.base.FLConfig` field (clients, rounds, alpha, model, seed, device, ...) or
    :class:`FedDGM` option (generator, space, ipc, iterations, surrogate, batched, ...). The generator's public
    split is removed from the training set (:func:`private_training_data`; ``exclude_public=False`` when the
    caller passes ``data`` it has already restricted). ``resume=RUN_DIR`` continues a
    killed run from its last checkpoint with the options recorded in its config.json (then ``out`` and the
    options must be left out). ``backend`` / ``ray_address``: where the clients and the looped per-client
    distillation run ("serial", "ray" or a :class:`fedlatent.parallel.RayBackend`, as in
    :func:`fedlatent.fl.simulation.simulate`; results are the same). ``log``: trackers besides metrics.csv
    (:mod:`fedlatent.tracking`, e.g. ``"tensorboard,mlflow"``). Returns a :class:`DistillResult`.
    """
    from ..parallel import make_backend

    runner = make_backend(backend, ray_address)
    try:
        return _distill_federated(dataset, data_root, preset, out, overwrite, resume, image_size, progress,
                                  checkpoint_every, data, exclude_public, runner, options, log)
    finally:
        if runner is not None and runner is not backend:
            runner.close()


def _distill_federated(dataset, data_root, preset, out, overwrite, resume, image_size, progress, checkpoint_every,
                       data, exclude_public, runner, options, log=None):
    """The body of :func:`distill_federated` (``runner``: None or a started-on-demand RayBackend)."""
    from ..data import load_dataset
    from .checkpoint import has_checkpoint, load_checkpoint, make_checkpoint_fn, resume_state
    from .run import RunFolder, read_metrics
    from .simulation import FLConfig, run_simulation

    resumed_from = None
    resume_arg = None
    cpu0 = time.process_time()
    if resume is not None:
        run_dir = Path(resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.is_file():
            raise FedLatentError(f"{run_dir}: not a run folder (config.json missing); nothing to resume")
        try:
            saved = json.loads(cfg_path.read_text())["distill"]
        except (ValueError, KeyError) as e:
            raise FedLatentError(f"{cfg_path}: not written by `fedlatent distill` ({type(e).__name__})") from None
        if options or out is not None:
            raise FedLatentError("--resume takes the options of the original run; give no other options")
        dataset, data_root, preset = saved["dataset"], saved["data_root"], saved["preset"]
        image_size, checkpoint_every = saved["image_size"], saved["checkpoint_every"]
        cfg_opts, meth_opts = dict(saved["config"]), dict(saved["method_options"])
        out, overwrite = run_dir, True
        if has_checkpoint(run_dir):
            ckpt = load_checkpoint(run_dir)
            resumed_from = ckpt["round"]
            resume_arg = resume_state(ckpt)
    else:
        if preset not in PRESETS:
            raise FedLatentError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        o_cfg, o_meth = _split_options(options)
        cfg_opts = {**PRESETS[preset]["config"], **o_cfg}
        meth_opts = {**PRESETS[preset]["method"], **o_meth}
        if out is None:
            out = Path("runs") / f"feddgm-{dataset.replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    meth_opts["progress"] = progress
    cfg = FLConfig(**cfg_opts).check()
    if out is not None and resume is None:
        RunFolder.check(out, overwrite)
    if data is None:
        if image_size is None and dataset == "digits":
            image_size = 16
        data = load_dataset(dataset, root=data_root, resize=image_size)
    elif resume is None:  # the caller's data: record its name, not the ``dataset`` argument's default
        dataset, data_root = data.name, None
    space = meth_opts.get("space")
    generator = meth_opts.get("generator")
    if generator is None and str(space).lower() != "pixel":
        generator = default_generator(data.name)
        if generator is None:
            raise FedLatentError(f"no generator for {data.name!r} in pretrained/MANIFEST.json; pass --generator "
                                 "NAME|PATH or --space pixel")
        meth_opts["generator"] = generator
    excluded = None
    if exclude_public:
        data, excluded = private_training_data(data, None if str(space).lower() == "pixel" else generator)
    import hashlib

    data_check = {"n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                  "labels_sha256": hashlib.sha256(data.y_train.cpu().numpy().tobytes()).hexdigest()}
    if resume is not None and saved.get("data_check") not in (None, data_check):
        raise FedLatentError(f"{resume}: the training data differ from the original run's ({saved['data_check']} vs "
                             f"{data_check}); cannot resume")
    meth_opts.setdefault("dataset", data.name)
    strategy = FedDGM(**meth_opts)
    if out is not None and resume is None and overwrite:  # stale artefacts of an older run in this folder
        _clean_artifacts(Path(out))
    record = {"dataset": dataset, "data_root": None if data_root is None else str(data_root), "preset": preset,
              "image_size": image_size, "checkpoint_every": checkpoint_every, "config": cfg.to_dict(),
              "method_options": {k: v for k, v in meth_opts.items() if k != "progress"}, "data_check": data_check}
    run_info = {"distill": record, "generator_public_split": excluded}
    if runner is not None:
        run_info["backend"] = runner.describe()
        runner.attach(strategy)
    ckpt_fn = make_checkpoint_fn(out, every=checkpoint_every) if out is not None else None
    from contextlib import nullcontext

    from ..tracking import open_trackers

    with open_trackers(out, log, resume_from=resumed_from) if out is not None else nullcontext() as tracker:
        sim = run_simulation(strategy, data, cfg, out_dir=out, overwrite=overwrite, run_info=run_info,
                             progress=progress, checkpoint_fn=ckpt_fn, resume=resume_arg,
                             client_map=runner.client_map if runner is not None else None, tracker=tracker)
        report = distilled = None
        if out is not None:
            out = Path(out)
            distilled = out / DISTILLED_FILE if (out / DISTILLED_FILE).is_file() else None
            report = write_report(out, read_metrics(out / "metrics.csv"), record, sim, strategy, excluded,
                                  cpu_s=time.process_time() - cpu0)
            if tracker:
                tracker.log_run_folder(out)
    return DistillResult(sim, Path(out) if out is not None else None, distilled, report, resumed_from)


def _clean_artifacts(folder: Path) -> None:
    import shutil

    for p in folder.glob("grid_round*.png"):
        p.unlink(missing_ok=True)
    for name in (DISTILLED_FILE, REPORT_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_report(folder: Path, rows: list[dict], record: Mapping[str, Any], sim, strategy: FedDGM,
                 excluded: Mapping[str, Any] | None, cpu_s: float | None = None) -> Path:
    """report.md: what ran, the accuracy table per round, timings."""
    cfg, meth = record["config"], record["method_options"]
    lines = [
        "# FedDGM run", "",
        f"- dataset: `{record['dataset']}` ({strategy.ctx.image_size} px, {strategy.ctx.num_classes} classes), "
        f"preset `{record['preset']}`",
        f"- clients: {cfg['clients']} ({cfg['partition']}, alpha {cfg['alpha']}), participation {cfg['participation']}, "
        f"{cfg['rounds']} rounds, {cfg['local_epochs']} local epochs (SGD lr {cfg['lr']}, momentum {cfg['momentum']})",
        f"- generator: `{strategy.generator_name or 'none'}` (sha256 {strategy.generator_sha256 or '-'}), "
        f"latent space {strategy.space}, init {strategy.init}",
        f"- distillation per client: ipc {strategy.ipc}, {strategy.iterations} iterations of {strategy.syn_steps} "
        f"syn_steps, lr_img {strategy.lr_img}, lr_w {strategy.lr_w}, lr_lr {strategy.lr_lr}, lr_teacher "
        f"{strategy.lr_teacher}, {strategy.mtt_mode} meta-gradient, batched={meth.get('batched', 'auto')}",
        f"- surrogate `{strategy.surrogate_spec}`, global model `{cfg['model']}`; server training {strategy.train_epochs} "
        f"epochs on the {strategy.pool_mode} pool (SGD lr {strategy.train_lr}, momentum {strategy.train_momentum}, "
        f"DSA {strategy.train_dsa})",
        f"- seed {cfg['seed']}, device {strategy.ctx.device}",
    ]
    if excluded:
        lines.append(f"- generator public split excluded from the clients' data: {excluded}")
    lines += ["", "## Global model accuracy", "",
              "| round | accuracy | loss | distill loss (first -> last) | syn lr | pool | local train loss | round s |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {int(r['round'])} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('loss'))} | "
                     f"{_fmt(r.get('distill_loss_first'))} -> {_fmt(r.get('distill_loss'))} | "
                     f"{_fmt(r.get('syn_lr'), '.4g')} | {_fmt(r.get('pool_size'), '.0f')} | "
                     f"{_fmt(r.get('train_loss'))} | {_fmt(r.get('round_s'), '.1f')} |")
    tot = {k: sum(float(r.get(k) or 0.0) for r in rows) for k in ("round_s", "distill_s", "server_train_s")}
    other = tot["round_s"] - tot["distill_s"] - tot["server_train_s"]
    lines += ["", "## Timings", "",
              f"- total wall time {sim.wall_s:.1f} s; rounds {tot['round_s']:.1f} s = server distillation "
              f"{tot['distill_s']:.1f} s + server training {tot['server_train_s']:.1f} s + clients/evaluation/IO "
              f"{other:.1f} s" + (f"; CPU time of this process {cpu_s:.1f} s" if cpu_s is not None else ""),
              f"- final accuracy {sim.final_accuracy:.4f}, best {sim.best_accuracy:.4f} (round {sim.best_round})",
              "", "## Files", "",
              "- `metrics.csv`, `accuracy.png`, `grid_round{r}.png` (distilled images per class), "
              f"`{DISTILLED_FILE}` (load with `fedlatent.load_distilled`), `checkpoints/` (resume with "
              "`fedlatent distill --resume DIR`)", ""]
    path = folder / REPORT_FILE
    from ..utils import atomic_write_text

    atomic_write_text(path, "\n".join(lines))
    return path


__all__ = ["FedDGM", "Pool", "PRESETS", "DistillResult", "distill_federated", "batched_meta_gradient", "batched_step",
           "apply_meta_gradient", "distill_clients", "DistilledSet", "harvest", "client_bytes", "available_bytes", "choose_batch", "train_on_pool",
           "save_class_grid", "private_training_data", "default_generator", "default_space", "generator_identity",
           "write_report"]
