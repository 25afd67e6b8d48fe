"""fedlatent's own fused CUDA ops, with a pure-PyTorch reference that runs everywhere else.

Ops (one dispatching function each; the reference of each is in :mod:`fedlatent.ops.reference`):

* :func:`bias_act` -- ``leaky_relu(x + b, alpha) * gain`` (the built-in generator's activation after every
  modulated convolution / mapping layer): one pass forward, one pass backward (``dx = dy * gain * slope``,
  the slope read from the saved *output*, so ``x`` need not be kept), ``db`` = the sum of ``dx``.
* :func:`sgd_step` -- the student's flat-parameter SGD step ``theta - lr * g`` (MTT eq. 1).
* :func:`trajectory_loss` / :func:`trajectory_loss_and_grad` -- MTT eq. 2,
  ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``: both squared norms in ONE read of the three vectors
  (per-block partial sums in float64, then a fixed-order final pass: deterministic), and the gradient
  ``dL/dtheta_N = 2 (theta_N - theta*) / den`` (``dL/dtheta_0 = -2 L (theta_0 - theta*) / den``,
  ``dL/dtheta* = -(both)``) in one more pass.
* :func:`dsa_augment` -- Differentiable Siamese Augmentation (:mod:`fedlatent.distill.augment`) with the
  groups ``color``, ``crop``, ``cutout``, ``flip`` fused: any run of them that appears in this order is ONE
  kernel (one block per image) taking the same drawn parameters as the reference. The colour group has a
  closed form: with ``m_c`` the per-pixel channel mean and ``M`` the per-image mean of the input,
  brightness ``b``, saturation ``s``, contrast ``k`` give ``y = ((x - m_c) s + m_c - M) k + M + b`` (the
  saturation step keeps the channel mean, so the contrast step's mean is ``M + b``); crop / cutout / flip
  are a gather with zeros, so the adjoint is a gather too, followed by
  ``dx = k s dz + k (1 - s) / C sum_c dz + (1 - k) / (C H W) sum dz``. ``scale`` and ``rotate`` keep the
  reference (``affine_grid`` + ``grid_sample``, already single CUDA kernels).

Backend selection, per call, by ``FEDLATENT_OPS``:

* ``auto`` (default): the CUDA kernels when the tensors are on a CUDA device and the extension builds, else
  the reference. A failed build warns ONCE per process and falls back (it is not retried).
* ``cuda``: always the CUDA kernels; CPU tensors or a failed build raise :class:`FedLatentError`.
* ``ref``: always the reference.

On CPU nothing changes: the reference is the expression the code used before. The extension is compiled
at first use (see :mod:`fedlatent.ops._build`: ninja, cached per torch/CUDA/python/architectures under
``$FEDLATENT_CACHE/ops`` or ``~/.cache/fedlatent/ops``); :func:`status` reports what happened, ``python -m
fedlatent.ops --build`` builds it ahead of time.

Differentiation order (why first-order use is enough, and what is supported anyway):

* The generator (``bias_act``) runs outside the student's steps: :class:`~fedlatent.generators.latent.LatentSet`
  renders, the distiller returns ``dL/dimages``, and the generator is back-propagated once (first order).
* DSA is applied to the synthetic images *before* the student. In unrolled MTT the inner
  ``autograd.grad(loss_n, theta, create_graph=True)`` runs from the loss to ``theta`` and never enters the
  augmentation (it sits upstream of the augmented batch); the outer gradient w.r.t. the images then passes
  through the augmentation's backward exactly once, without ``create_graph``. The exact (adjoint) mode calls
  ``autograd.grad(augmented, images, dx)`` once per step. So first-order autograd suffices
  (``tests/test_ops.py`` checks unrolled and exact meta-gradients with the fused path against the reference).
* The SGD step and the trajectory loss *are* inside the unrolled graph (``create_graph=True``), so they
  must be twice differentiable.

All four are nevertheless differentiable to any order at no extra cost (see :mod:`fedlatent.ops.fused`:
each backward is built from the same kernels or from PyTorch expressions), so no op has to stay outside the
unrolled steps. Supported dtypes on the CUDA path: float32, float64, float16, bfloat16 (arithmetic in
float32/float64); other dtypes use the reference.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator

import torch

from ..utils import FedLatentError
from . import _build, fused, reference
from .emulate import COLOR, CROP, CUTOUT, FLIP, TorchKernels
from .reference import SQRT2

MODES = ("ref", "cuda", "auto")
ENV = "FEDLATENT_OPS"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OVERRIDE: list = []  # stack of kernel providers forced by emulate() (testing)


def mode() -> str:
    """The value of ``FEDLATENT_OPS`` (``auto`` when unset); anything else raises :class:`FedLatentError`."""
    m = os.environ.get(ENV, "").strip().lower() or "auto"
    if m not in MODES:
        raise FedLatentError(f"{ENV}={os.environ.get(ENV)!r} is not one of ref, cuda, auto")
    return m


def _on_cuda(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    return bool(ts) and all(t.is_cuda for t in ts)


def _kernels(*tensors: torch.Tensor | None):
    """The kernel provider for an op on ``tensors``, or None for the reference path."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    m = mode()
    if m == "ref":
        return None
    if m == "cuda":
        if not _on_cuda(*tensors):
            raise FedLatentError(f"{ENV}=cuda but the op's tensors are not on a CUDA device "
                                 f"(torch.cuda.is_available()={torch.cuda.is_available()}); use {ENV}=auto or ref")
        return _build.load_extension(strict=True)
    if not _on_cuda(*tensors):
        return None
    return _build.load_extension(strict=False)  # None (warned once) if the build failed


def backend_for(*tensors: torch.Tensor | None) -> str:
    """``"cuda"``, ``"emulated"`` or ``"ref"``: which implementation an op on ``tensors`` would use now."""
    k = _kernels(*tensors)
    return "ref" if k is None else ("emulated" if isinstance(k, TorchKernels) else "cuda")


@contextmanager
def emulate(kernels: TorchKernels | None = None) -> Iterator[TorchKernels]:
    """Run every op through the fused autograd Functions with PyTorch re-statements of the CUDA kernels
    (:class:`~fedlatent.ops.emulate.TorchKernels`), on any device, whatever ``FEDLATENT_OPS`` says.

    A testing aid: it checks the kernels' formulas and the Functions' (double) backward on a machine without
    a GPU. Process-wide (not thread-local) while active.
    """
    k = kernels or TorchKernels()
    _OVERRIDE.append(k)
    try:
        yield k
    finally:
        _OVERRIDE.remove(k)


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, alpha: float = 0.2,
             gain: float = SQRT2) -> torch.Tensor:
    """``leaky_relu(x + b, alpha) * gain``, ``b`` (1-D, ``x.shape[dim]`` entries, or None) broadcast along
    ``dim``. Needs ``alpha >= 0`` and ``gain > 0`` (the backward reads the slope from the output's sign).

    The result keeps the memory layout of a dense ``x`` (e.g. ``channels_last``) on every path. Mixed
    precision: on the fused path a bias of another float dtype is cast to ``x.dtype`` first (differentiably:
    its gradient comes back in the bias's dtype), so under AMP (float16/bfloat16 ``x``, float32 bias) the result is in ``x.dtype``,
    as StyleGAN's ``bias_act`` does; the reference (CPU) follows PyTorch's type promotion instead (float32
    result), exactly as before the ops existed."""
    if not (alpha >= 0 and gain > 0):
        raise FedLatentError(f"bias_act needs alpha >= 0 and gain > 0, got alpha={alpha}, gain={gain}")
    if x.ndim == 0:
        raise FedLatentError("bias_act needs a tensor with at least one dimension")
    if b is not None and (b.ndim != 1 or b.numel() != x.shape[dim % x.ndim]):
        raise FedLatentError(f"bias_act: bias of shape {tuple(b.shape)} does not match dimension {dim} of "
                             f"x {tuple(x.shape)}")
    kern = _kernels(x, b)
    if kern is None or x.dtype not in _DTYPES or (b is not None and b.dtype not in _DTYPES) or x.numel() == 0:
        return reference.bias_act(x, b, dim, alpha, gain)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return fused.BiasAct.apply(x, b, dim, float(alpha), float(gain), kern)


def sgd_step(theta: torch.Tensor, g: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """``theta - lr * g`` (MTT eq. 1) for flat vectors; ``lr`` a float or a one-element tensor (differentiable)."""
    if theta.shape != g.shape:
        raise FedLatentError(f"sgd_step: parameters {tuple(theta.shape)} and gradient {tuple(g.shape)} differ")
    kern = _kernels(theta, g)
    if kern is None or theta.dtype not in _DTYPES or g.dtype != theta.dtype or theta.numel() == 0:
        return reference.sgd_step(theta, g, lr)
    if torch.is_tensor(lr):
        if lr.numel() != 1:
            raise FedLatentError(f"sgd_step: lr must be one number, got shape {tuple(lr.shape)}")
        lr = lr.to(device=theta.device, dtype=theta.dtype)
    return fused.SgdStep.apply(theta, g, lr, kern)


def _check_traj(e: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
    if not (e.shape == s.shape == t.shape):
        raise FedLatentError(f"trajectory loss: parameter vectors of different shapes {tuple(e.shape)}, "
                             f"{tuple(s.shape)}, {tuple(t.shape)}")


def _traj_fused_ok(kern, e, s, t) -> bool:
    return (kern is not None and t.dtype in _DTYPES and e.dtype == t.dtype == s.dtype and t.numel() > 0)


def trajectory_loss(theta_end: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """MTT eq. 2, ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``; differentiable w.r.t. all three."""
    _check_traj(theta_end, theta_start, theta_target)
    kern = _kernels(theta_end, theta_start, theta_target)
    if not _traj_fused_ok(kern, theta_end, theta_start, theta_target):
        return reference.trajectory_loss(theta_end, theta_start, theta_target)
    return fused.TrajectoryLoss.apply(theta_end, theta_start, theta_target, kern)


def trajectory_loss_and_grad(theta_end: torch.Tensor, theta_start: torch.Tensor,
                             theta_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MTT eq. 2 loss, its gradient w.r.t. ``theta_end``) without autograd: the exact adjoint's start ``v_N``."""
    _check_traj(theta_end, theta_start, theta_target)
    kern = _kernels(theta_end, theta_start, theta_target)
    if not _traj_fused_ok(kern, theta_end, theta_start, theta_target):
        return reference.trajectory_loss_and_grad(theta_end, theta_start, theta_target)
    e, s, t = (v.detach().contiguous() for v in (theta_end, theta_start, theta_target))
    loss, stats = kern.traj_fwd(e, s, t)
    de, _, _ = kern.traj_bwd(None, stats, e, s, t, True, False, False)
    return loss, de


_FUSABLE = {"color": (0, COLOR), "crop": (1, CROP), "cutout": (2, CUTOUT), "flip": (3, FLIP)}


def dsa_runs(groups: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Split a DSA group sequence into fusable runs (color/crop/cutout/flip in that order) and single groups."""
    runs: list[tuple[str, ...]] = []
    cur: list[str] = []
    for g in groups:
        if g in _FUSABLE and (not cur or _FUSABLE[g][0] > _FUSABLE[cur[-1]][0]):
            cur.append(g)
            continue
        if cur:
            runs.append(tuple(cur))
            cur = []
        if g in _FUSABLE:
            cur = [g]
        else:
            runs.append((g,))
    if cur:
        runs.append(tuple(cur))
    return runs


def dsa_pack(run: tuple[str, ...], values: dict, ratio_cutout: float, batch: int, height: int,
             width: int) -> tuple[torch.Tensor, int]:
    """The packed float64 parameter table ``[1 or B, 10]`` and the flags of one fused run (kernel layout:
    brightness, saturation, contrast, shift_h, shift_w, cut_top, cut_left, cut_h, cut_w, flip)."""
    keys = {"color": ("brightness", "saturation", "contrast"), "crop": ("shift_h", "shift_w"),
            "cutout": ("cut_h", "cut_w"), "flip": ("flip",)}
    sizes = {int(values[k].numel()) for g in run for k in keys[g]}
    n = max(sizes)
    if not sizes <= {1, n} or n not in (1, batch):
        raise FedLatentError(f"DSA parameters must have 1 or {batch} (batch) entries, got sizes {sorted(sizes)}")
    P = torch.zeros(n, TorchKernels.DSA_PARAMS, dtype=torch.float64)
    P[:, 1] = 1.0
    P[:, 2] = 1.0
    flags = 0
    for g in run:
        flags |= _FUSABLE[g][1]
        if g == "color":
            P[:, 0], P[:, 1], P[:, 2] = (values[k].double() for k in keys[g])
        elif g == "crop":
            P[:, 3], P[:, 4] = values["shift_h"].double(), values["shift_w"].double()
        elif g == "cutout":
            ch, cw = int(height * ratio_cutout + 0.5), int(width * ratio_cutout + 0.5)
            P[:, 5] = values["cut_h"].double() - ch // 2
            P[:, 6] = values["cut_w"].double() - cw // 2
            P[:, 7], P[:, 8] = float(ch), float(cw)
        elif g == "flip":
            P[:, 9] = values["flip"].double()
    return P, flags


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host-device sync: a CUDA copy goes through pinned memory with
    ``non_blocking=True`` (a pageable-memory copy blocks the host until the stream reaches it, once per
    MTT step). PyTorch's pinned-memory allocator keeps the staging block alive until the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def dsa_augment(x: torch.Tensor, draw, dsa) -> torch.Tensor:
    """Apply one DSA draw (:class:`~fedlatent.distill.augment.AugDraw`) of ``dsa`` (a
    :class:`~fedlatent.distill.augment.DSA`) to images ``[B, C, H, W]``; differentiable w.r.t. ``x``."""
    if not draw.groups:
        return x
    kern = _kernels(x)
    if kern is None or x.ndim != 4 or x.dtype not in _DTYPES or x.numel() == 0:
        return reference.dsa_augment(x, draw, dsa)
    B, _, H, W = x.shape
    for run in dsa_runs(draw.groups):
        if run[0] in _FUSABLE:
            P, flags = dsa_pack(run, draw.values, dsa.params.ratio_cutout, B, H, W)
            x = fused.DsaPass.apply(x, _to_device(P, x.device), flags, kern)
        else:
            x = dsa.apply_groups(x, draw, run)
    return x


# ------------------------------------------------------------------------------------------------
def build(verbose: bool = False):
    """Build (or load from the cache) the CUDA extension now; raises :class:`FedLatentError` on failure."""
    return _build.load_extension(strict=True, verbose=verbose)


def status(build: bool = False) -> dict:
    """What the ops would do and what the extension build did in this process (JSON-friendly).

    Keys: ``mode`` (FEDLATENT_OPS), ``backend`` (what ops on GPU tensors use now: ``cuda``, ``ref``, or why
    not), ``cuda_available``, ``loaded`` (extension imported in this process), ``built`` (a compiled library
    is in the cache), ``build_dir``, ``archs``, ``error`` (of the build, one line), ``build_seconds`` (build
    or cache load in this process), ``torch``, ``torch_cuda``, ``nvcc``, ``cuda_home``.
    With ``build=True`` the extension is built/loaded first (failures are reported, not raised).
    """
    if build:
        _build.load_extension(strict=False)
    st = _build.STATE
    try:
        m = mode()
    except FedLatentError as e:
        m = f"invalid ({e})"
    archs = st.archs or _build.arch_list()
    if m == "ref":
        backend = "ref"
    elif not torch.cuda.is_available():
        backend = "ref (no GPU)" if m == "auto" else "error (no GPU)"
    elif st.module is not None:
        backend = "cuda"
    elif st.tried:
        backend = "ref (build failed)" if m == "auto" else "error (build failed)"
    else:
        backend = "untried (builds at first use on CUDA tensors)"
    return {
        "mode": m,
        "backend": backend,
        "cuda_available": torch.cuda.is_available(),
        "loaded": st.module is not None,
        "built": _build.built(archs),
        "build_dir": st.build_dir or str(_build.build_dir(archs)),
        "archs": archs,
        "error": st.error,
        "build_seconds": st.seconds,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": shutil.which("nvcc"),
        "cuda_home": _build.find_cuda_home(),
    }


__all__ = ["bias_act", "sgd_step", "trajectory_loss", "trajectory_loss_and_grad", "dsa_augment", "status", "build",
           "mode", "backend_for", "emulate", "dsa_runs", "dsa_pack", "MODES", "SQRT2", "TorchKernels"]
