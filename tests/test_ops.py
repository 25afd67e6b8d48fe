"""fedlatent.ops: the reference equals the plain formulas; the fused autograd Functions (on PyTorch emulations of
the kernels) equal the reference, pass gradcheck/gradgradcheck and keep MTT/generator gradients unchanged;
FEDLATENT_OPS dispatch and the warn-once fallback; a real build of the extension (slow); and, on a GPU, the
CUDA kernels against the reference."""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from fedlatent import ops
from fedlatent.distill import mtt
from fedlatent.distill.augment import DSA, AugDraw
from fedlatent.models import get_model
from fedlatent.models.functional import FlatModel
from fedlatent.ops import _build, fused, reference
from fedlatent.ops.emulate import TorchKernels
from fedlatent.utils import FedLatentError

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=D64, device="cpu"):
    """Random, never-zero test inputs."""
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype).to(device)


class CountingKernels(TorchKernels):
    """Emulated kernels that record every call (and whether a graph was being built during it)."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.grad_mode: dict[str, list[bool]] = {}

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.endswith(("_fwd", "_bwd")) or name == "sgd_step":
            calls, modes = object.__getattribute__(self, "calls"), object.__getattribute__(self, "grad_mode")

            def wrapped(*a, **k):
                calls[name] = calls.get(name, 0) + 1
                modes.setdefault(name, []).append(torch.is_grad_enabled())
                return attr(*a, **k)

            return wrapped
        return attr


# ------------------------------------------------------------------------------------------------
# reference == plain formulas
# ------------------------------------------------------------------------------------------------
def _lrelu_formula(z, alpha, gain):
    return torch.where(z > 0, z, alpha * z) * gain


@pytest.mark.parametrize("shape,dim", [((3, 5, 4, 4), 1), ((6, 7), -1), ((6, 7), 1), ((2, 3, 5), 0)])
def test_reference_bias_act_is_the_formula(shape, dim):
    x = _randn(*shape)
    b = _randn(shape[dim], seed=1)
    view = [1] * len(shape)
    view[dim] = -1
    want = _lrelu_formula(x + b.view(view), 0.2, math.sqrt(2))
    assert torch.allclose(reference.bias_act(x, b, dim), want, rtol=0, atol=1e-14)
    assert torch.allclose(reference.bias_act(x, None, dim, alpha=0.1, gain=1.5), _lrelu_formula(x, 0.1, 1.5),
                          rtol=0, atol=1e-14)
    # what the generator computed before the ops existed, bit for bit
    if len(shape) == 4:
        assert torch.equal(reference.bias_act(x, b), F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * math.sqrt(2))


def test_reference_sgd_step_and_trajectory_loss():
    th, g = _randn(50), _randn(50, seed=1)
    assert torch.equal(reference.sgd_step(th, g, 0.3), th - 0.3 * g)
    e, s, t = _randn(50, seed=2), _randn(50, seed=3), _randn(50, seed=4)
    num = sum(float(a - c) ** 2 for a, c in zip(e, t))
    den = sum(float(a - c) ** 2 for a, c in zip(s, t))
    assert float(reference.trajectory_loss(e, s, t)) == pytest.approx(num / den, rel=1e-12)
    loss, v = reference.trajectory_loss_and_grad(e, s, t)
    ee = e.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.trajectory_loss(ee, s, t), ee)
    assert float(loss) == pytest.approx(num / den, rel=1e-12)
    assert torch.allclose(v, want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# fused Functions on emulated kernels == reference, gradcheck
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dim,with_bias", [((2, 3, 4, 4), 1, True), ((4, 6), 1, True), ((4, 6), -1, False),
                                                  ((3, 2, 5), 2, True)])
def test_fused_bias_act_matches_reference_and_gradchecks(shape, dim, with_bias):
    x = _randn(*shape).requires_grad_(True)
    b = _randn(shape[dim], seed=1).requires_grad_(True) if with_bias else None
    dy = _randn(*shape, seed=2)
    inputs = [x] + ([b] if with_bias else [])
    y_ref = reference.bias_act(x, b, dim, 0.2, math.sqrt(2))
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    with ops.emulate() as k:
        assert ops.backend_for(x) == "emulated"
        y = ops.bias_act(x, b, dim)
        assert type(y.grad_fn).__name__ == "BiasActBackward"
        g = torch.autograd.grad(y, inputs, dy)
        assert torch.allclose(y, y_ref, rtol=1e-14, atol=1e-14)
        for a, c in zip(g, g_ref):
            assert torch.allclose(a, c, rtol=1e-13, atol=1e-13)

        def f(*t):
            return fused.BiasAct.apply(t[0], t[1] if with_bias else None, dim, 0.2, math.sqrt(2), k)

        assert gradcheck(f, tuple(inputs), fast_mode=True)
        assert gradgradcheck(f, tuple(inputs), fast_mode=True)


def test_fused_sgd_step_matches_reference_and_gradchecks():
    th, g = _randn(40).requires_grad_(True), _randn(40, seed=1).requires_grad_(True)
    lr = torch.tensor(0.37, dtype=D64, requires_grad=True)
    with ops.emulate() as k:
        out = ops.sgd_step(th, g, lr)
        assert type(out.grad_fn).__name__ == "SgdStepBackward"
        assert torch.allclose(out, th - lr * g, rtol=0, atol=1e-15)
        assert torch.allclose(ops.sgd_step(th, g, 0.25), th - 0.25 * g, rtol=0, atol=1e-15)
        assert gradcheck(lambda a, b, c: fused.SgdStep.apply(a, b, c, k), (th, g, lr))
        assert gradgradcheck(lambda a, b, c: fused.SgdStep.apply(a, b, c, k), (th, g, lr))
        assert gradcheck(lambda a, b: fused.SgdStep.apply(a, b, 0.25, k), (th, g))


def test_fused_trajectory_loss_matches_reference_and_gradchecks():
    e, s, t = (_randn(30, seed=i).requires_grad_(True) for i in range(3))
    with ops.emulate() as k:
        loss = ops.trajectory_loss(e, s, t)
        assert type(loss.grad_fn).__name__ == "TrajectoryLossBackward"
        ref = reference.trajectory_loss(e, s, t)
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-13)
        for a, c in zip(torch.autograd.grad(loss, (e, s, t)), torch.autograd.grad(ref, (e, s, t))):
            assert torch.allclose(a, c, rtol=1e-12, atol=1e-14)
        f = lambda a, b, c: fused.TrajectoryLoss.apply(a, b, c, k)  # noqa: E731
        assert gradcheck(f, (e, s, t))
        assert gradgradcheck(f, (e, s, t))  # the create_graph branch
        lv, v = ops.trajectory_loss_and_grad(e.detach(), s.detach(), t.detach())
        lr_, vr = reference.trajectory_loss_and_grad(e.detach(), s.detach(), t.detach())
        assert float(lv) == pytest.approx(float(lr_), rel=1e-13)
        assert torch.allclose(v, vr, rtol=1e-12, atol=0)


def _non_contiguous(v: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``v`` in another memory layout: ``t`` transposed storage, ``s`` a strided slice of a
    bigger buffer (not dense), ``cl`` channels_last (4-D)."""
    if how == "t":
        w = v.detach().reshape(v.shape[0], -1).t().contiguous().t().reshape(v.shape) if v.ndim > 1 else None
        if w is None or w.is_contiguous():  # 1-D (or a degenerate shape): a strided slice instead
            return _non_contiguous(v, "s")
    elif how == "s":
        w = torch.zeros(2 * v.numel(), dtype=v.dtype)[::2].reshape(v.shape) if v.ndim == 1 else \
            torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)[..., ::2]
        w.copy_(v.detach())
    else:
        w = v.detach().contiguous(memory_format=torch.channels_last)
    assert not w.is_contiguous() and torch.equal(w, v.detach())
    return w.requires_grad_(v.requires_grad)


@pytest.mark.parametrize("layouts", [("t", "s", None), (None, "s", "s"), ("s", None, None)])
def test_fused_trajectory_loss_double_backward_with_non_contiguous_inputs(layouts):
    """The create_graph branch differentiates the SAVED inputs: contiguous copies would be cut off from the graph
    (double backward raising, or - with mixed contiguity - silently missing terms)."""
    e, s, t = (_randn(4, 6, seed=i).requires_grad_(True) for i in range(3))
    e, s, t = (v if how is None else _non_contiguous(v, how) for v, how in zip((e, s, t), layouts))
    with ops.emulate() as k:
        f = lambda a, b, c: fused.TrajectoryLoss.apply(a, b, c, k)  # noqa: E731
        assert gradcheck(f, (e, s, t)) and gradgradcheck(f, (e, s, t))
        g = torch.autograd.grad(ops.trajectory_loss(e, s, t), (e, s, t), create_graph=True)
        h = torch.autograd.grad(sum((gi * gi).sum() for gi in g), (e, s, t))
    g_ref = torch.autograd.grad(reference.trajectory_loss(e, s, t), (e, s, t), create_graph=True)
    h_ref = torch.autograd.grad(sum((gi * gi).sum() for gi in g_ref), (e, s, t))
    for a, c in zip(g + h, g_ref + h_ref):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-14)


def test_fused_sgd_step_and_dsa_double_backward_with_non_contiguous_inputs():
    th, g = _non_contiguous(_randn(5, 4).requires_grad_(True), "t"), _non_contiguous(_randn(5, 4, seed=1), "s")
    g.requires_grad_(True)
    lr = torch.tensor(0.37, dtype=D64, requires_grad=True)
    x = _non_contiguous(_randn(2, 3, 5, 4, seed=2).requires_grad_(True), "cl")
    xs = _non_contiguous(_randn(2, 3, 5, 4, seed=3).requires_grad_(True), "s")
    draw = _fixed_draw(("color", "crop", "cutout", "flip"), 2, 5, 4, seed=4)
    P, flags = ops.dsa_pack(draw.groups, draw.values, 0.5, 2, 5, 4)
    with ops.emulate() as k:
        assert gradgradcheck(lambda a, b, c: fused.SgdStep.apply(a, b, c, k), (th, g, lr))
        for xi in (x, xs):
            assert gradgradcheck(lambda a: fused.DsaPass.apply(a, P, flags, k), (xi,), fast_mode=True)


@pytest.mark.parametrize("layout", ["cl", "t", "s"])
def test_fused_bias_act_keeps_the_layout_and_double_backward_of_non_contiguous_inputs(layout):
    x = _non_contiguous(_randn(2, 3, 4, 5).requires_grad_(True), layout)
    b = _randn(3, seed=1).requires_grad_(True)
    dy = _randn(2, 3, 4, 5, seed=2)
    y_ref = reference.bias_act(x, b)
    g_ref = torch.autograd.grad(y_ref, (x, b), dy)
    with ops.emulate() as k:
        y = ops.bias_act(x, b)
        g = torch.autograd.grad(y, (x, b), dy)
        if layout != "s":  # a dense input keeps its layout (channels_last stays channels_last), no copy
            assert y.stride() == x.stride() and g[0].stride() == x.stride()
        assert not y._is_view()
        y.mul_(1.0)  # an ordinary tensor: in-place use after the op is allowed
        assert gradgradcheck(lambda a, c: fused.BiasAct.apply(a, c, 1, 0.2, math.sqrt(2), k), (x, b))
    assert torch.allclose(y, y_ref, rtol=1e-14, atol=1e-14)
    for a, c in zip(g, g_ref):
        assert torch.allclose(a, c, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_low_precision_matches_the_float64_reference(dtype):
    """float16 / bfloat16 through the fused Functions (emulated kernels compute in the input dtype, the CUDA
    kernels in float32: both within low-precision tolerance of the float64 formulas). Under AMP (float32 bias)
    the fused bias_act casts the bias to x.dtype and returns x.dtype; the reference promotes to float32."""
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=5e-2, atol=5e-2)
    x64, b64, dy64 = _randn(2, 4, 3, 3), _randn(4, seed=1), _randn(2, 4, 3, 3, seed=2)
    want = reference.bias_act(x64, b64)
    (want_dx,) = torch.autograd.grad(reference.bias_act(x64.requires_grad_(True), b64), x64, dy64)
    x = x64.detach().to(dtype).requires_grad_(True)
    for b in (b64.to(dtype), b64.float()):  # same dtype, and the AMP case
        b = b.detach().requires_grad_(True)
        with ops.emulate():
            y = ops.bias_act(x, b)
            assert type(y.grad_fn).__name__ == "BiasActBackward" and y.dtype == dtype
            dx, db = torch.autograd.grad(y, (x, b), dy64.to(dtype))
        assert db.dtype == b.dtype and dx.dtype == dtype
        assert torch.allclose(y.double(), want, **tol) and torch.allclose(dx.double(), want_dx, **tol)
        assert torch.allclose(db.double(), want_dx.sum((0, 2, 3)), rtol=tol["rtol"], atol=10 * tol["atol"])
    assert ops.bias_act(x, b64.float()).dtype == torch.float32  # the reference (CPU) path: type promotion
    e, s, t = (_randn(40, seed=i) for i in range(3, 6))
    with ops.emulate():
        loss = ops.trajectory_loss(*(v.to(dtype) for v in (e, s, t)))
        step = ops.sgd_step(e.to(dtype), s.to(dtype), 0.1)
        draw = _fixed_draw(("color", "crop", "cutout", "flip"), 2, 5, 5, seed=6)
        dsa = DSA("color_crop_cutout_flip", siamese=False, mode="all")
        img = _randn(2, 3, 5, 5, seed=7)
        aug = dsa.apply(img.to(dtype), draw)
    assert loss.dtype == step.dtype == aug.dtype == dtype
    assert float(loss) == pytest.approx(float(reference.trajectory_loss(e, s, t)), rel=tol["rtol"])
    assert torch.allclose(step.double(), e - 0.1 * s, **tol)
    assert torch.allclose(aug.double(), dsa.apply_reference(img, draw), **tol)


# -- DSA -----------------------------------------------------------------------------------------
def _fixed_draw(groups, n, H, W, seed):
    """Random, non-trivial parameters of the fusable groups (n = 1: siamese, n = B: per image)."""
    g = _gen(seed)
    vals = {
        "brightness": torch.rand(n, generator=g, dtype=D64) - 0.5,
        "saturation": torch.rand(n, generator=g, dtype=D64) * 2.0 + 0.1,
        "contrast": torch.rand(n, generator=g, dtype=D64) + 0.5,
        "shift_h": torch.randint(-2, 3, (n,), generator=g),
        "shift_w": torch.randint(-2, 3, (n,), generator=g),
        "cut_h": torch.randint(0, H + 1, (n,), generator=g),
        "cut_w": torch.randint(0, W + 1, (n,), generator=g),
        "flip": torch.rand(n, generator=g, dtype=D64) < 0.5,
    }
    if n == 1:  # make sure the siamese draw really shifts and flips
        vals["shift_h"][0], vals["shift_w"][0], vals["flip"][0] = 2, -1, True
    return AugDraw(tuple(groups), vals)


RUNS = [("color",), ("crop",), ("cutout",), ("flip",), ("color", "crop", "cutout", "flip"), ("crop", "flip"),
        ("color", "cutout"), ("cutout", "flip")]


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("groups", RUNS)
def test_fused_dsa_matches_reference_and_gradchecks(groups, per_image):
    B, C, H, W = 3, 3, 6, 5
    dsa = DSA("_".join(groups), siamese=not per_image, mode="all")
    draw = _fixed_draw(groups, B if per_image else 1, H, W, seed=len(groups) + 7 * per_image)
    x = _randn(B, C, H, W, seed=11).requires_grad_(True)
    dy = _randn(B, C, H, W, seed=12)
    y_ref = dsa.apply_reference(x, draw)
    (g_ref,) = torch.autograd.grad(y_ref, x, dy)
    with ops.emulate() as k:
        y = dsa.apply(x, draw)
        assert type(y.grad_fn).__name__ == "DsaPassBackward"
        (g,) = torch.autograd.grad(y, x, dy)
        assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-12)
        P, flags = ops.dsa_pack(tuple(groups), draw.values, dsa.params.ratio_cutout, B, H, W)
        f = lambda a: fused.DsaPass.apply(a, P, flags, k)  # noqa: E731
        assert gradcheck(f, (x,), fast_mode=True)
        assert gradgradcheck(f, (x,), fast_mode=True)


def test_dsa_runs_split_only_fusable_ordered_groups():
    assert ops.dsa_runs(("color", "crop", "cutout", "flip", "scale", "rotate")) == [
        ("color", "crop", "cutout", "flip"), ("scale",), ("rotate",)]
    assert ops.dsa_runs(("flip", "color", "scale", "crop")) == [("flip",), ("color",), ("scale",), ("crop",)]
    assert ops.dsa_runs(("rotate",)) == [("rotate",)]
    assert ops.dsa_runs(("crop", "crop")) == [("crop",), ("crop",)]


@pytest.mark.parametrize("siamese", [True, False])
def test_fused_dsa_all_groups_with_reference_affine_in_between(siamese):
    dsa = DSA("flip_color_crop_scale_cutout_rotate_flip", siamese=siamese, mode="all")
    x = _randn(4, 3, 8, 8, seed=3).requires_grad_(True)
    dy = _randn(4, 3, 8, 8, seed=4)
    for seed in range(3):
        y_ref = dsa(x, seed)
        (g_ref,) = torch.autograd.grad(y_ref, x, dy)
        with ops.emulate():
            y = dsa(x, seed)
            (g,) = torch.autograd.grad(y, x, dy)
        assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def test_dsa_pack_rejects_wrong_parameter_counts():
    draw = _fixed_draw(("crop",), 2, 6, 6, seed=0)
    with pytest.raises(FedLatentError, match="1 or 5"):
        ops.dsa_pack(("crop",), draw.values, 0.5, 5, 6, 6)


# -- end to end: MTT meta-gradients and the generator ----------------------------------------------
def _mtt_problem(seed=0, soft=False):
    g = _gen(seed)
    torch.manual_seed(seed)
    model = get_model("convnet-d3:width=4", 3, 4, 8).double()
    flat = FlatModel(model)
    start = flat.flatten() + 0.1 * torch.randn(flat.numel, generator=g, dtype=D64)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=D64)
    x = torch.randn(8, 3, 8, 8, generator=g, dtype=D64)
    y = torch.randn(8, 4, generator=g, dtype=D64) if soft else torch.arange(8) % 4
    return flat, start, target, x, y


@pytest.mark.parametrize("mode,engine,soft", [("unrolled", "autograd", True), ("exact", "convnet", False),
                                              ("exact", "autograd", True)])
def test_meta_gradient_with_fused_ops_equals_reference(mode, engine, soft):
    """Unrolled MTT differentiates through the SGD steps (double backward of SgdStep) and through DSA once;
    the fused path gives the reference's loss and gradients, and DSA's backward never builds a graph."""
    flat, start, target, x, y = _mtt_problem(soft=soft)
    plan = mtt.make_plan(8, 3, 6, seed=2)
    dsa = DSA("color_crop_cutout_flip_scale", siamese=False, mode="all")
    log_lr = torch.tensor(math.log(0.1), dtype=D64)
    ref = mtt.meta_gradient(flat, start, target, x, y, log_lr, plan, dsa, mode=mode, engine=engine)
    with ops.emulate(CountingKernels()) as k:
        res = mtt.meta_gradient(flat, start, target, x, y, log_lr, plan, dsa, mode=mode, engine=engine)
    assert res.loss == pytest.approx(ref.loss, rel=1e-12)
    for a, b in ((res.grad_images, ref.grad_images), (res.grad_log_lr, ref.grad_log_lr), (res.theta_end, ref.theta_end)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    if soft:
        assert torch.allclose(res.grad_labels, ref.grad_labels, rtol=1e-9, atol=1e-13)
    assert k.calls["sgd_step"] >= len(plan)
    assert k.calls["dsa_fwd"] >= len(plan) and k.calls["dsa_bwd"] == len(plan)  # one backward pass per step
    assert not any(k.grad_mode["dsa_bwd"])  # ... first order: no graph built through the augmentation
    assert k.calls["traj_fwd"] == 1


def test_generator_with_fused_bias_act_equals_reference():
    from fedlatent.generators.builtin import BuiltinConfig, BuiltinStyleGenerator

    torch.manual_seed(0)
    G = BuiltinStyleGenerator(BuiltinConfig(img_resolution=16, img_channels=3, c_dim=3, z_dim=8, w_dim=16,
                                            embed_dim=8, channel_base=64, channel_max=8)).double()
    z = _randn(4, 8, seed=1)
    c = F.one_hot(torch.arange(4) % 3, 3).double()
    ws = G.mapping(z, c).detach().requires_grad_(True)
    img_ref = G.synthesis(ws)
    dimg = _randn(*img_ref.shape, seed=2)
    params = [ws] + list(G.parameters())
    g_ref = torch.autograd.grad(img_ref, params, dimg, allow_unused=True)
    with ops.emulate(CountingKernels()) as k:
        img = G.synthesis(ws)
        g = torch.autograd.grad(img, params, dimg, allow_unused=True)
        w2 = G.mapping(z, c)
    assert k.calls["bias_act_fwd"] == len(G.synthesis.layer_names) - 1 + G.cfg.mapping_layers
    assert torch.allclose(img, img_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(w2, ws, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# dispatch, FEDLATENT_OPS, warn-once fallback, status
# ------------------------------------------------------------------------------------------------
def test_mode_values(monkeypatch):
    monkeypatch.delenv("FEDLATENT_OPS", raising=False)
    assert ops.mode() == "auto"
    for v in ("ref", "CUDA", " auto "):
        monkeypatch.setenv("FEDLATENT_OPS", v)
        assert ops.mode() == v.strip().lower()
    monkeypatch.setenv("FEDLATENT_OPS", "fast")
    with pytest.raises(FedLatentError, match="FEDLATENT_OPS='fast' is not one of ref, cuda, auto"):
        ops.bias_act(_randn(2, 3), None)


def test_cpu_tensors_use_the_reference_without_building(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the extension must not be built for CPU tensors")

    monkeypatch.setattr(_build, "load_extension", boom)
    x, b = _randn(2, 3, 4, 4).requires_grad_(True), _randn(3, seed=1)
    for v in ("auto", "ref"):
        monkeypatch.setenv("FEDLATENT_OPS", v)
        assert ops.backend_for(x) == "ref"
        y = ops.bias_act(x, b)
        assert y.grad_fn is not None and type(y.grad_fn).__name__ != "BiasActBackward"  # not the fused Function
        assert torch.equal(y, F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * math.sqrt(2))
        loss = ops.trajectory_loss(*(_randn(7, seed=i).requires_grad_(True) for i in range(3)))
        assert type(loss.grad_fn).__name__ != "TrajectoryLossBackward"
    monkeypatch.setenv("FEDLATENT_OPS", "ref")
    monkeypatch.setattr(ops, "_on_cuda", lambda *t: True)  # even for CUDA tensors
    assert ops.backend_for(x) == "ref"


def test_cuda_mode_without_gpu_tensors_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("FEDLATENT_OPS", "cuda")
    with pytest.raises(FedLatentError) as e:
        ops.sgd_step(_randn(5), _randn(5, seed=1), 0.1)
    assert "FEDLATENT_OPS=cuda" in str(e.value) and "\n" not in str(e.value)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    calls = []

    def failing_compile(archs, directory, verbose=False):
        calls.append(archs)
        raise RuntimeError("Error building extension 'fedlatent_ops'\nnvcc fatal : Unsupported gpu architecture")

    monkeypatch.setattr(_build, "STATE", _build.BuildState())
    monkeypatch.setattr(_build, "_compile", failing_compile)
    monkeypatch.setattr(ops, "_on_cuda", lambda *t: True)  # pretend the tensors are on a GPU
    monkeypatch.setenv("FEDLATENT_OPS", "auto")
    x, b = _randn(2, 3, 4, 4), _randn(3, seed=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [ops.bias_act(x, b) for _ in range(3)]
        e, s, t = _randn(9), _randn(9, seed=1), _randn(9, seed=2)
        ops.trajectory_loss(e, s, t)
    assert len(calls) == 1  # tried once per process
    ours = [m for m in w if "fedlatent CUDA ops unavailable" in str(m.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "Unsupported gpu architecture" in str(ours[0].message) and "\n" not in str(ours[0].message)
    assert all(torch.equal(o, reference.bias_act(x, b)) for o in outs)
    st = ops.status()
    assert st["backend"] == ("ref (build failed)" if GPU else "ref (no GPU)")
    assert not st["loaded"] and "RuntimeError" in st["error"]
    monkeypatch.setenv("FEDLATENT_OPS", "cuda")
    with pytest.raises(FedLatentError, match="could not be built") as err:
        ops.bias_act(x, b)
    assert "\n" not in str(err.value)


def test_argument_errors():
    x = _randn(2, 3)
    with pytest.raises(FedLatentError, match="alpha >= 0 and gain > 0"):
        ops.bias_act(x, None, alpha=-0.1)
    with pytest.raises(FedLatentError, match="does not match dimension"):
        ops.bias_act(x, _randn(4))
    with pytest.raises(FedLatentError, match="differ"):
        ops.sgd_step(_randn(3), _randn(4), 0.1)
    with pytest.raises(FedLatentError, match="different shapes"):
        ops.trajectory_loss(_randn(3), _randn(3), _randn(4))


def test_status_and_build_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLATENT_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX")
    assert _build.arch_list() == "8.6+PTX"
    d = _build.build_dir()
    assert d.parent == tmp_path / "ops" and "sm86PTX" in d.name and torch.__version__.split("+")[0] in d.name
    assert _build.gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(FedLatentError, match="bad CUDA architecture"):
        _build.gencode_flags("sm_80")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not GPU:
        assert _build.arch_list() == _build.DEFAULT_ARCHS
    st = ops.status()
    for key in ("mode", "backend", "cuda_available", "loaded", "built", "build_dir", "archs", "error", "torch_cuda"):
        assert key in st
    assert st["build_dir"].startswith(str(tmp_path)) or st["loaded"]
    home = _build.find_cuda_home()
    if shutil.which("nvcc"):
        assert home is not None and (__import__("pathlib").Path(home) / "include" / "cuda_runtime.h").is_file()


# ------------------------------------------------------------------------------------------------
# a real build (CPU machines with nvcc too)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None, reason="needs nvcc and CUDA torch")
def test_extension_compiles_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLATENT_CACHE", str(tmp_path))
    monkeypatch.setenv("MAX_JOBS", "2")
    monkeypatch.setattr(_build, "STATE", _build.BuildState())
    t0 = time.perf_counter()
    mod = ops.build()
    seconds = time.perf_counter() - t0
    print(f"fedlatent ops: compiled and loaded in {seconds:.1f} s")
    for name in ("bias_act_fwd", "bias_act_bwd", "sgd_step", "traj_fwd", "traj_bwd", "dsa_fwd", "dsa_bwd"):
        assert callable(getattr(mod, name))
    assert mod.DSA_PARAMS == TorchKernels.DSA_PARAMS
    st = ops.status()
    assert st["loaded"] and st["built"] and st["error"] is None and st["build_dir"].startswith(str(tmp_path))
    if not GPU:  # the kernels refuse CPU tensors with a clear error instead of crashing
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            mod.sgd_step(torch.ones(3), torch.ones(3), None, 0.1)


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the reference
# ------------------------------------------------------------------------------------------------
F32_TOL = dict(rtol=1e-5, atol=1e-5)


ALLOW_NO_BUILD = "FEDLATENT_OPS_ALLOW_NO_BUILD"


@pytest.fixture
def cuda_ops(monkeypatch):
    """FEDLATENT_OPS=cuda and the loaded extension. On a GPU machine a missing CUDA toolkit or a failed build
    FAILS the test (the kernels would silently go untested otherwise), unless FEDLATENT_OPS_ALLOW_NO_BUILD=1."""
    allow = os.environ.get(ALLOW_NO_BUILD, "").strip() not in ("", "0")
    if _build.find_cuda_home() is None:
        msg = "GPU present but no CUDA toolkit (nvcc + headers) to build the extension"
        if allow:
            pytest.skip(f"{msg} ({ALLOW_NO_BUILD}=1)")
        pytest.fail(f"{msg}; install it, or set {ALLOW_NO_BUILD}=1 to skip the CUDA kernel tests")
    monkeypatch.setenv("FEDLATENT_OPS", "cuda")
    try:
        return ops.build()
    except FedLatentError as e:
        if allow:
            pytest.skip(f"the extension did not build ({ALLOW_NO_BUILD}=1): {e}")
        raise


def _ref(monkeypatch, fn, *a):
    monkeypatch.setenv("FEDLATENT_OPS", "ref")
    try:
        return fn(*a)
    finally:
        monkeypatch.setenv("FEDLATENT_OPS", "cuda")


@needs_gpu
@pytest.mark.parametrize("shape,dim,with_bias,dtype", [
    ((8, 64, 16, 16), 1, True, torch.float32), ((33, 128), 1, True, torch.float32), ((5, 7, 3), -1, False, torch.float32),
    ((4, 32, 8, 8), 1, True, torch.float64), ((4, 32, 8, 8), 1, True, torch.float16),
    ((4, 32, 8, 8), 1, True, torch.bfloat16)])
def test_cuda_bias_act_matches_reference(cuda_ops, monkeypatch, shape, dim, with_bias, dtype):
    x = _randn(*shape, seed=1, dtype=torch.float32, device="cuda").to(dtype).requires_grad_(True)
    b = _randn(shape[dim], seed=2, dtype=torch.float32, device="cuda").to(dtype).requires_grad_(True) if with_bias else None
    dy = _randn(*shape, seed=3, dtype=torch.float32, device="cuda").to(dtype)
    inputs = [x] + ([b] if with_bias else [])
    y = ops.bias_act(x, b, dim)
    assert type(y.grad_fn).__name__ == "BiasActBackward"
    g = torch.autograd.grad(y, inputs, dy)
    y_ref = _ref(monkeypatch, ops.bias_act, x, b, dim)
    g_ref = torch.autograd.grad(y_ref, inputs, dy)
    tol = F32_TOL if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(y.float(), y_ref.float(), **tol)
    for a, c in zip(g, g_ref):  # db sums many terms: absolute tolerance relative to its scale
        assert torch.allclose(a.float(), c.float(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(c.abs().max())))


@needs_gpu
def test_cuda_bias_act_noncontiguous_input(cuda_ops, monkeypatch):
    x = _randn(6, 16, 8, 8, seed=4, dtype=torch.float32, device="cuda").permute(0, 1, 3, 2)
    b = _randn(16, seed=5, dtype=torch.float32, device="cuda")
    assert torch.allclose(ops.bias_act(x, b), _ref(monkeypatch, ops.bias_act, x, b), **F32_TOL)


@needs_gpu
def test_cuda_gradcheck_float64(cuda_ops):
    k = cuda_ops
    x = _randn(2, 3, 4, 5, seed=1, device="cuda").requires_grad_(True)
    b = _randn(3, seed=2, device="cuda").requires_grad_(True)
    f = lambda a, c: fused.BiasAct.apply(a, c, 1, 0.2, math.sqrt(2), k)  # noqa: E731
    assert gradcheck(f, (x, b)) and gradgradcheck(f, (x, b))
    th, g = _randn(50, seed=3, device="cuda").requires_grad_(True), _randn(50, seed=4, device="cuda").requires_grad_(True)
    lr = torch.tensor(0.3, dtype=D64, device="cuda", requires_grad=True)
    f = lambda a, c, d: fused.SgdStep.apply(a, c, d, k)  # noqa: E731
    assert gradcheck(f, (th, g, lr)) and gradgradcheck(f, (th, g, lr))
    e, s, t = (_randn(70, seed=i, device="cuda").requires_grad_(True) for i in range(5, 8))
    f = lambda a, c, d: fused.TrajectoryLoss.apply(a, c, d, k)  # noqa: E731
    assert gradcheck(f, (e, s, t)) and gradgradcheck(f, (e, s, t))
    xi = _randn(2, 3, 6, 5, seed=8, device="cuda").requires_grad_(True)
    for groups in RUNS:
        for n in (1, 2):
            draw = _fixed_draw(groups, n, 6, 5, seed=9)
            P, flags = ops.dsa_pack(groups, draw.values, 0.5, 2, 6, 5)
            f = lambda a: fused.DsaPass.apply(a, P.cuda(), flags, k)  # noqa: E731
            assert gradcheck(f, (xi,)) and gradgradcheck(f, (xi,))


@needs_gpu
@pytest.mark.parametrize("n", [1, 1000, 3_000_001])
def test_cuda_sgd_step_and_trajectory_loss_match_reference(cuda_ops, monkeypatch, n):
    e, s, t, g = (_randn(n, seed=i, dtype=torch.float32, device="cuda") for i in range(4))
    lr = torch.tensor(0.05, device="cuda")
    assert torch.allclose(ops.sgd_step(e, g, lr), e - lr * g, **F32_TOL)
    assert torch.allclose(ops.sgd_step(e, g, 0.05), e - 0.05 * g, **F32_TOL)
    ee, ss, tt = (v.clone().requires_grad_(True) for v in (e, s, t))
    loss = ops.trajectory_loss(ee, ss, tt)
    grads = torch.autograd.grad(loss, (ee, ss, tt))
    ref = _ref(monkeypatch, ops.trajectory_loss, ee, ss, tt)
    ref_grads = torch.autograd.grad(ref, (ee, ss, tt))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for a, c in zip(grads, ref_grads):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6 * float(c.abs().max()))
    lv, v = ops.trajectory_loss_and_grad(e, s, t)
    assert float(lv) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(v, ref_grads[0], rtol=1e-4, atol=1e-6 * float(v.abs().max()))
    assert torch.equal(ops.trajectory_loss(e, s, t), ops.trajectory_loss(e, s, t))  # deterministic reduction


@needs_gpu
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("groups", RUNS)
def test_cuda_dsa_matches_reference(cuda_ops, monkeypatch, groups, per_image):
    B, C, H, W = 16, 3, 32, 32
    dsa = DSA("_".join(groups), siamese=not per_image, mode="all")
    draw = _fixed_draw(groups, B if per_image else 1, H, W, seed=3 + per_image)
    x = _randn(B, C, H, W, seed=5, dtype=torch.float32, device="cuda").requires_grad_(True)
    dy = _randn(B, C, H, W, seed=6, dtype=torch.float32, device="cuda")
    y = dsa.apply(x, draw)
    assert type(y.grad_fn).__name__ == "DsaPassBackward"
    (g,) = torch.autograd.grad(y, x, dy)
    y_ref = _ref(monkeypatch, dsa.apply, x, draw)
    (g_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert torch.allclose(y, y_ref, **F32_TOL)
    assert torch.allclose(g, g_ref, **F32_TOL)


@needs_gpu
def test_cuda_dsa_forward_does_not_synchronise(cuda_ops):
    """The packed DSA parameters go to the GPU through pinned memory (non_blocking): no host sync per call."""
    dsa = DSA("color_crop_cutout_flip", siamese=False, mode="all")
    x = _randn(8, 3, 16, 16, seed=1, dtype=torch.float32, device="cuda")
    draw = _fixed_draw(dsa.groups, 8, 16, 16, seed=2)
    want = dsa.apply(x, draw)  # warm-up: pinned-memory pool, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = dsa.apply(x, draw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, want)


@needs_gpu
@pytest.mark.parametrize("mode,engine", [("exact", "convnet"), ("unrolled", "autograd")])
def test_cuda_meta_gradient_matches_reference(cuda_ops, monkeypatch, mode, engine):
    flat, start, target, x, y = _mtt_problem(seed=1, soft=True)
    flat.model.cuda()
    start, target, x, y = start.cuda(), target.cuda(), x.cuda(), y.cuda()
    plan = mtt.make_plan(8, 4, 6, seed=3)
    dsa = DSA(siamese=False, mode="all")
    log_lr = torch.tensor(math.log(0.1), dtype=D64, device="cuda")
    res = mtt.meta_gradient(flat, start, target, x, y, log_lr, plan, dsa, mode=mode, engine=engine)
    ref = _ref(monkeypatch, mtt.meta_gradient, flat, start, target, x, y, log_lr, plan, dsa, mode, engine)
    assert res.loss == pytest.approx(ref.loss, rel=1e-9)
    for a, b in ((res.grad_images, ref.grad_images), (res.grad_log_lr, ref.grad_log_lr),
                 (res.grad_labels, ref.grad_labels)):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


@needs_gpu
def test_cuda_generator_matches_reference(cuda_ops, monkeypatch):
    from fedlatent.generators.builtin import BuiltinConfig, BuiltinStyleGenerator

    torch.manual_seed(0)
    G = BuiltinStyleGenerator(BuiltinConfig(img_resolution=32, img_channels=3, c_dim=10)).cuda()
    z = torch.randn(16, G.z_dim, device="cuda")
    c = F.one_hot(torch.arange(16, device="cuda") % 10, 10).float()
    ws = G.mapping(z, c).detach().requires_grad_(True)
    img = G.synthesis(ws)
    dimg = torch.randn_like(img)
    (g,) = torch.autograd.grad(img, ws, dimg)
    img_ref = _ref(monkeypatch, G.synthesis, ws)
    (g_ref,) = torch.autograd.grad(img_ref, ws, dimg)
    assert torch.allclose(img, img_ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(g, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))


def test_cli_ops_status_and_bad_mode(monkeypatch):
    import json

    from click.testing import CliRunner

    from fedlatent.cli import main

    monkeypatch.setenv("FEDLATENT_OPS", "ref")
    r = CliRunner().invoke(main, ["ops", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["mode"] == "ref" and st["backend"] == "ref"
    monkeypatch.setenv("FEDLATENT_OPS", "fast")
    r = CliRunner().invoke(main, ["ops"])
    assert r.exit_code == 2 and "FEDLATENT_OPS" in r.output and "ref, cuda, auto" in r.output
