"""Trajectory matching: gradients vs finite differences, exact == unrolled, kernels, errors, loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlatent import compiling
from fedlatent.distill import compiled, mtt
from fedlatent.distill.augment import DSA
from fedlatent.distill.distiller import DistillConfig, Distiller, TrajectorySampler
from fedlatent.distill.experts import load_experts, save_experts, train_experts
from fedlatent.distill.kernels import AutogradKernel, ConvNetKernel, make_kernel
from fedlatent.distill.pixels import evaluate_synthetic, init_synthetic
from fedlatent.models import get_model
from fedlatent.models.functional import FlatModel
from fedlatent.synthetic import PixelSet
from fedlatent.utils import FedLatentError

K = 4  # classes in the toy problems


def _problem(spec="convnet-d3:width=4", n=8, size=8, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = get_model(spec, 3, K, size).double()
    flat = FlatModel(model)
    with torch.no_grad():  # move away from the init so that norms/biases are generic
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    start = flat.flatten()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=start.dtype)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randn(n, K, generator=g, dtype=torch.float64) if soft else torch.arange(n) % K
    return flat, start, target, x, y


def _rel(a, b):
    return float((a - b).norm() / b.norm())


LOG_LR = torch.tensor(math.log(0.1), dtype=torch.float64)


# -- small identities --------------------------------------------------------------------------
def test_trajectory_loss_identities():
    s, t = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert float(mtt.trajectory_loss(t, s, t)) == 0.0
    assert float(mtt.trajectory_loss(s, s, t)) == pytest.approx(1.0)
    mid = 0.5 * (s + t)
    assert float(mtt.trajectory_loss(mid, s, t)) == pytest.approx(0.25)


def test_plan_is_seeded_and_covers_the_set():
    a = mtt.make_plan(10, 7, 4, seed=3)
    b = mtt.make_plan(10, 7, 4, seed=3)
    assert all(torch.equal(p.indices, q.indices) and p.seed == q.seed for p, q in zip(a, b))
    assert [len(p.indices) for p in a[:3]] == [2, 4, 4]  # chunks of one permutation, popped from the end
    assert sorted(torch.cat([p.indices for p in a[:3]]).tolist()) == list(range(10))
    assert len({p.seed for p in a}) == 7
    assert all(p.seed is None for p in mtt.make_plan(10, 3, 10, seed=0, augment=False))


def test_student_step_is_one_sgd_step():
    flat, start, _, x, y = _problem()
    step = mtt.make_plan(8, 1, 8, seed=0, augment=False)[0]
    new = mtt.student_step(flat, start, x, y, LOG_LR, step)
    th = start.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(flat(th, x[step.indices]), y[step.indices])
    (g,) = torch.autograd.grad(loss, th)
    assert torch.allclose(new, start - 0.1 * g)


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("soft", [False, True])
def test_unrolled_gradients_match_central_finite_differences(soft):
    flat, start, target, x, y = _problem(soft=soft)
    dsa = DSA(siamese=True, mode="all")
    plan = mtt.make_plan(8, 3, 5, seed=1)

    def loss(xx=x, ll=LOG_LR, yy=y):
        return mtt.meta_gradient(flat, start, target, xx, yy, ll, plan, dsa, mode="unrolled", engine="autograd").loss

    res = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, dsa, mode="unrolled", engine="autograd")
    eps = 1e-6
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    fd = (loss(xx=x + eps * d) - loss(xx=x - eps * d)) / (2 * eps)
    assert float((res.grad_images * d).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    fd = (loss(ll=LOG_LR + eps) - loss(ll=LOG_LR - eps)) / (2 * eps)
    assert float(res.grad_log_lr) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    if soft:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=y.dtype)
        fd = (loss(yy=y + eps * dy) - loss(yy=y - eps * dy)) / (2 * eps)
        assert float((res.grad_labels * dy).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    else:
        assert res.grad_labels is None


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("siamese", [True, False])
def test_exact_equals_unrolled_for_both_engines(soft, siamese):
    flat, start, target, x, y = _problem(soft=soft, seed=2)
    plan = mtt.make_plan(8, 4, 6, seed=4)
    dsa = DSA(siamese=siamese, mode="all")
    ref = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, dsa, mode="unrolled", engine="autograd")
    for mode in ("exact", "unrolled"):
        for engine in ("autograd", "convnet"):
            r = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, dsa, mode=mode, engine=engine)
            assert r.loss == pytest.approx(ref.loss, rel=1e-12)
            assert _rel(r.grad_images, ref.grad_images) < 1e-5
            assert _rel(r.grad_log_lr, ref.grad_log_lr) < 1e-5
            assert torch.allclose(r.theta_end, ref.theta_end, rtol=1e-10, atol=1e-12)
            if soft:
                assert _rel(r.grad_labels, ref.grad_labels) < 1e-5


def test_the_hessian_terms_matter():
    """Dropping the second-order terms (TESLA-style detached weights) gives a different gradient,
    so the equality above really tests the H v recursion."""
    flat, start, target, x, y = _problem(seed=3)
    plan = mtt.make_plan(8, 4, 8, seed=0, augment=False)
    exact = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, mode="exact")
    thetas, th = [start], start
    for st in plan:
        th = mtt.student_step(flat, th, x, y, LOG_LR, st)
        thetas.append(th.detach())
    v = 2 * (th - target) / (start - target).pow(2).sum()
    xx = x.clone().requires_grad_(True)
    approx = torch.zeros_like(x)
    for n, st in enumerate(plan):  # sum_n (dg_n/dX)^T (-alpha v_N) with theta_n held fixed
        t = thetas[n].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(flat(t, xx), y)
        (g,) = torch.autograd.grad(loss, t, create_graph=True)
        (gx,) = torch.autograd.grad((g * (-0.1 * v)).sum(), xx)
        approx += gx
    assert _rel(approx, exact.grad_images) > 1e-3


@pytest.mark.parametrize("shape,size", [((2, 3, 4, 4), (8, 8)), ((2, 3, 3, 3), (7, 7)), ((1, 5, 2, 4), (5, 8)),
                                        ((2, 4, 1, 1), (3, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pooling_adjoint_is_atens_bitwise(shape, size, dtype, channels_last):
    """pool_adjoint, the 2x2 average pooling's adjoint that compiled kernels use, equals ATen's
    avg_pool2d_backward bitwise at even, odd (floor mode drops a row / column), non-square and one-pixel sizes,
    in either memory format; and it is the adjoint: <pool(x), g> == <x, pool_adjoint(g)>."""
    from fedlatent.distill.kernels import pool_adjoint

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    like = torch.empty(*shape[:2], *size, dtype=dtype).contiguous(memory_format=fmt)
    want = torch.ops.aten.avg_pool2d_backward(g, like, [2, 2], [2, 2], [0, 0], False, True, None)
    got = pool_adjoint(g, size)
    assert got.shape == want.shape and torch.equal(got, want)
    x = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    lhs = (torch.nn.functional.avg_pool2d(x, 2) * g.double()).sum()
    assert float(lhs) == pytest.approx(float((x * pool_adjoint(g.double(), size)).sum()), rel=1e-12)


@pytest.mark.parametrize("spec,soft", [
    ("convnet-d3:width=6", False),
    ("convnet:width=5,depth=2,norm=none", True),
    ("convnet:width=5,depth=2,pooling=none", True),
])
def test_convnet_kernel_matches_autograd_kernel(spec, soft):
    flat, start, _, x, y = _problem(spec=spec, n=5, soft=soft, seed=7)
    assert ConvNetKernel.supports(flat.model)
    u = torch.randn(start.shape, generator=torch.Generator().manual_seed(1), dtype=start.dtype)
    A, C = AutogradKernel(flat), ConvNetKernel(flat)
    la, ga, ca = A.forward(start, x, y, keep=True)
    lc, gc, cc = C.forward(start, x, y, keep=True)
    assert float(lc) == pytest.approx(float(la), rel=1e-12)
    assert _rel(gc, ga) < 1e-10
    ha, xa, ya = A.rop(ca, u)
    hc, xc, yc = C.rop(cc, u)
    assert _rel(hc, ha) < 1e-10 and _rel(xc, xa) < 1e-10
    if soft:
        assert _rel(yc, ya) < 1e-10
    hl, xl, _ = C.rop(C.forward(start, x, y, keep=True, lean=True)[2], u)  # lean cache: recomputes dn, dz
    assert _rel(hl, ha) < 1e-10 and _rel(xl, xa) < 1e-10
    assert C.rop(C.forward(start, x, y, keep=True, need_grad=False)[2], u, need_theta=False)[0] is None
    for K in (A, C):  # the adjoint walk's fused recompute + R-operator is exactly rop(forward(keep=True))
        for need in (True, False):
            ref = K.rop(K.forward(start, x, y, keep=True, need_grad=False)[2], u, need_theta=need)
            got = K.recompute_rop(start, x, y, u, need_theta=need)
            assert all((r is None and g is None) or torch.equal(r, g) for r, g in zip(ref, got))
    # Hu is the Hessian-vector product: compare with a finite difference of gradients
    eps = 1e-6
    gp = C.forward(start + eps * u, x, y, keep=False)[1]
    gm = C.forward(start - eps * u, x, y, keep=False)[1]
    assert _rel(hc, (gp - gm) / (2 * eps)) < 1e-5


@pytest.mark.parametrize("spec,soft", [
    ("convnet-d3:width=6", False),
    ("convnet:width=5,depth=2,norm=none", True),
    ("convnet:width=5,depth=2,pooling=none", False),
])
def test_grouped_convnet_kernel_is_each_students_kernel(spec, soft):
    """G students as one grouped network: loss, gradient, Hu and (dg/dx)^T u of each equal its own kernel's."""
    G = 3
    probs = [_problem(spec=spec, n=5, soft=soft, seed=10 + k) for k in range(G)]
    flat = probs[0][0]
    theta = torch.stack([p[1] for p in probs])
    x = torch.stack([p[3] for p in probs])
    y = torch.stack([p[4] for p in probs])
    u = torch.randn(theta.shape, generator=torch.Generator().manual_seed(2), dtype=theta.dtype)
    one, grp = ConvNetKernel(flat), ConvNetKernel(flat, groups=G)
    lg, gg, cg = grp.forward(theta, x, y, keep=True)
    hg, xg, yg = grp.rop(cg, u)
    hl, xl, _ = grp.rop(grp.forward(theta, x, y, keep=True, lean=True, need_grad=False)[2], u)
    assert lg.shape == (G,) and gg.shape == theta.shape and hg.shape == theta.shape and xg.shape == x.shape
    for k in range(G):
        l1, g1, c1 = one.forward(theta[k], x[k], y[k], keep=True)
        h1, x1, y1 = one.rop(c1, u[k])
        assert float(lg[k]) == pytest.approx(float(l1), rel=1e-12)
        assert _rel(gg[k], g1) < 1e-12 and _rel(hg[k], h1) < 1e-12 and _rel(xg[k], x1) < 1e-12
        assert _rel(hl[k], h1) < 1e-12 and _rel(xl[k], x1) < 1e-12
        if soft:
            assert _rel(yg[k], y1) < 1e-12
    assert _rel(hg[0], hg[1]) > 1e-3  # different students, different products


@pytest.mark.parametrize("spec", ["convnet-d3:width=5", "mlp"])
def test_batched_meta_gradient_equals_the_loop_float64(spec):
    """batched_meta_gradient (grouped ConvNet, or vmap for other models) == meta_gradient per problem, 1e-9."""
    from fedlatent.distill.batched import batched_meta_gradient

    G = 3
    probs = [_problem(spec="convnet-d3:width=5", n=6, seed=20 + k) for k in range(G)]
    flat = probs[0][0]
    if spec == "mlp":
        flat = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh(), nn.Linear(6, K)).double())
        probs = [(flat, flat.flatten() + 0.1 * k, flat.flatten() + 0.1 * k + 0.05, p[3], p[4])
                 for k, p in enumerate(probs)]
    starts = torch.stack([p[1] for p in probs])
    ends = torch.stack([p[2] for p in probs])
    x = torch.stack([p[3] for p in probs])
    y = torch.stack([p[4] for p in probs])
    log_lr = torch.log(torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64))
    plans = [mtt.make_plan(6, 3, 4, seed=k) for k in range(G)]
    aug = DSA(siamese=False)
    for n in (G, 1):
        res = batched_meta_gradient(flat, starts[:n], ends[:n], x[:n], y[:n], log_lr[:n], plans[:n], aug)
        for k in range(n):
            ref = mtt.meta_gradient(flat, starts[k], ends[k], x[k], y[k], log_lr[k], plans[k], aug, mode="exact")
            assert res[k].loss == pytest.approx(ref.loss, rel=1e-12)
            assert _rel(res[k].grad_images, ref.grad_images) < 1e-9
            assert float(res[k].grad_log_lr) == pytest.approx(float(ref.grad_log_lr), rel=1e-9)
            assert _rel(res[k].theta_end, ref.theta_end) < 1e-12
            assert ref.grad_images.abs().max() > 0


def test_batched_meta_gradient_runs_the_loops_engine():
    """``batched_meta_gradient(engine=)`` runs the engine the loop's ``meta_gradient(engine=)`` runs: 'autograd'
    (vmap over the students) equals the loop to 1e-9 in float64; 'convnet-bf16' (the grouped kernel with bf16
    convolution operands) is the loop's bf16 result up to fp32 reassociation, far closer to it than to fp32's."""
    from fedlatent.distill.batched import batched_meta_gradient

    G = 2
    probs = [_problem(spec="convnet-d3:width=6", n=6, size=8, seed=40 + k) for k in range(G)]
    flat = probs[0][0]
    starts, ends = torch.stack([p[1] for p in probs]), torch.stack([p[2] for p in probs])
    x, y = torch.stack([p[3] for p in probs]), torch.stack([p[4] for p in probs])
    log_lr = torch.log(torch.tensor([0.1, 0.05], dtype=torch.float64))
    plans = [mtt.make_plan(6, 3, 6, seed=k) for k in range(G)]
    res = batched_meta_gradient(flat, starts, ends, x, y, log_lr, plans, None, engine="autograd")
    for k in range(G):
        ref = mtt.meta_gradient(flat, starts[k], ends[k], x[k], y[k], log_lr[k], plans[k], None, engine="autograd")
        assert _rel(res[k].grad_images, ref.grad_images) < 1e-9 and ref.grad_images.abs().max() > 0
    f32 = FlatModel(flat.model.float())
    args = (starts.float(), ends.float(), x.float(), y, log_lr.float(), plans, None)
    bf = batched_meta_gradient(f32, *args, engine="convnet-bf16")
    for k in range(G):
        loop_bf = mtt.meta_gradient(f32, *(a[k] for a in args[:5]), plans[k], None, engine="convnet-bf16")
        loop_32 = mtt.meta_gradient(f32, *(a[k] for a in args[:5]), plans[k], None, engine="convnet")
        to_bf, to_32 = _rel(bf[k].grad_images, loop_bf.grad_images), _rel(bf[k].grad_images, loop_32.grad_images)
        assert to_32 > 1e-4 and to_bf < 0.1 * to_32, (to_bf, to_32)


def test_bf16_convolutions_are_bf16_operands_fp32_sums_bf16_results(monkeypatch):
    """The bf16 convolutions of the ConvNet kernel, forward and both backward products, are the exact convolution
    of bf16-rounded operands rounded to bf16 (up to fp32 summation): where the hardware has no bf16 arithmetic the
    kernel emulates that (fp32 convolutions of rounded operands), where it has, oneDNN's bf16 convolutions do it."""
    flat = FlatModel(get_model("convnet-d3:width=16", 3, K, 16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    W, b = torch.randn(16, 16, 3, 3, generator=g), torch.randn(16, generator=g)
    go = torch.randn(6, 16, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)

    def r(t):
        return t.bfloat16().double()

    want_z = r(F.conv2d(r(x), r(W), padding=1)) + b.double().view(1, -1, 1, 1)
    want_dx, want_dw, _ = torch.ops.aten.convolution_backward(r(go), r(x), r(W), None, [1, 1], [1, 1], [1, 1],
                                                              False, [0, 0], 1, [True, True, False])
    for native in (False, True):
        monkeypatch.setattr(compiled, "native_bf16", lambda dev, n=native: n)
        kern = ConvNetKernel(flat, conv_dtype=torch.bfloat16)
        assert kern.emulate is (not native)
        z = kern._conv(x, W, b)
        dx, dw, db = kern._conv_bwd(go, x, W, [True, True, True])
        assert z.dtype == dx.dtype == dw.dtype == torch.float32
        tol = 2e-4 if not native else 1e-2  # emulated: fp32 sums; native: whatever summation the hardware does
        assert _rel(z.double(), want_z) < tol and _rel(dx.double(), r(want_dx)) < tol
        assert _rel(dw.double(), r(want_dw)) < tol and _rel(db.double(), go.double().sum((0, 2, 3))) < 1e-6
        assert _rel(z.double(), F.conv2d(x.double(), W.double(), b.double(), padding=1)) > 1e-3  # really bf16
    monkeypatch.undo()
    assert ConvNetKernel(flat, conv_dtype=torch.bfloat16).emulate is (not compiled.native_bf16("cpu"))
    assert ConvNetKernel(flat).emulate is False


def test_bf16_convolutions_stay_within_tolerance_of_fp32():
    """engine 'convnet-bf16' (bf16 convolution operands, fp32 elsewhere): the meta-gradient stays within the
    documented tolerance of the fp32 kernel's (relative L2 error of dX < 10 %, d log_lr < 5 %, the loss < 1 %),
    and it really runs in bf16 (it differs from fp32)."""
    flat, start, target, x, y = _problem(spec="convnet-d3:width=16", n=10, size=16, seed=5)
    flat = FlatModel(flat.model.float())
    args = (flat, start.float(), target.float(), x.float(), y, LOG_LR.float(), mtt.make_plan(10, 4, 10, seed=3),
            DSA(siamese=False))
    ref = mtt.meta_gradient(*args, mode="exact", engine="convnet")
    bf = mtt.meta_gradient(*args, mode="exact", engine="convnet-bf16")
    assert bf.grad_images.dtype == torch.float32
    err = _rel(bf.grad_images, ref.grad_images)
    assert 1e-5 < err < 0.1, err
    assert float(bf.grad_log_lr) == pytest.approx(float(ref.grad_log_lr), rel=5e-2)
    assert bf.loss == pytest.approx(ref.loss, rel=1e-2)
    with pytest.raises(FedLatentError, match="convnet-bf16"):
        mtt.meta_gradient(*args, engine="convnet-fp8")


@pytest.mark.slow
def test_compiled_kernel_equals_the_plain_kernel():
    """engine 'convnet-compiled' (ConvNetKernel.forward / .rop under torch.compile): in float64 the exact and the
    unrolled meta-gradients equal the uncompiled kernel's to 1e-10 (inductor only reorders sums): exact mode with
    hard labels, unrolled mode (the lean cache) with soft labels."""
    if compiling.compile_unavailable():
        pytest.skip(compiling.compile_unavailable())
    from torch._dynamo.utils import counters

    counters.clear()
    for soft, mode in ((False, "exact"), (True, "unrolled")):
        flat, start, target, x, y = _problem(spec="convnet-d3:width=6", n=8, size=8, soft=soft, seed=2)
        args = (flat, start, target, x, y, LOG_LR, mtt.make_plan(8, 3, 8, seed=1), DSA(siamese=False))
        ref = mtt.meta_gradient(*args, mode=mode, engine="convnet")
        got = mtt.meta_gradient(*args, mode=mode, engine="convnet-compiled")
        assert not compiling.STATE["failed"]
        assert got.loss == pytest.approx(ref.loss, rel=1e-12)
        assert _rel(got.grad_images, ref.grad_images) < 1e-10
        assert float(got.grad_log_lr) == pytest.approx(float(ref.grad_log_lr), rel=1e-10)
        if soft:
            assert _rel(got.grad_labels, ref.grad_labels) < 1e-10
        assert ref.grad_images.abs().max() > 0
    assert counters["frames"]["ok"] >= 4  # forward and rop really ran compiled (not the eager fallback)


def test_compiled_kernel_errors_and_fallback(monkeypatch, request):
    """No compiler: a one-line FedLatentError naming the cause. A compiler failure at run time: a warning and the
    uncompiled kernel's exact results; bad input still raises its own error."""
    flat, start, target, x, y = _problem()
    plan = mtt.make_plan(8, 2, 8, seed=0)
    monkeypatch.setattr(compiling, "compile_unavailable", lambda: "no C++ compiler found (test)")
    with pytest.raises(FedLatentError, match="C\\+\\+ compiler.*-compiled"):
        make_kernel(flat, "convnet-compiled")
    monkeypatch.undo()
    request.getfixturevalue("broken_compiler")
    with pytest.raises(FedLatentError, match="do not fit"):  # the eager kernel's error, not the compiler's
        mtt.meta_gradient(flat, start, target, x[:, :, :6, :6], y, LOG_LR, plan, engine="convnet-compiled")
    assert not compiling.STATE["failed"]
    ref = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, DSA(), engine="convnet")
    with pytest.warns(RuntimeWarning, match="backend compiler failed.*uncompiled"):
        got = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, DSA(), engine="convnet-compiled")
    assert compiling.STATE["failed"]
    assert torch.equal(got.grad_images, ref.grad_images) and got.loss == ref.loss
    assert make_kernel(flat, "convnet-compiled").compiled is False  # later kernels do not try again


def test_compiled_functions_take_the_cpp_wrapper_on_cpu_only(monkeypatch):
    """compiling.compiled: on the CPU inductor gets CPU_INDUCTOR_OPTIONS (the C++ wrapper); on CUDA, or when
    COMPILE_OPTIONS names a mode (torch.compile takes mode or options, not both), it does not; one function per
    name and device type; call() picks the device type from the first tensor argument."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    monkeypatch.setattr(compiling, "_COMPILED", {})
    f = lambda a, t: t + 1  # noqa: E731
    assert compiling.compiled(f, "f") is compiling.compiled(f, "f", "cpu")
    assert seen == [{"dynamic": False, "options": {"cpp_wrapper": True}}]
    compiling.compiled(f, "f", "cuda")
    assert seen[-1] == {"dynamic": False}
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "mode", "max-autotune-no-cudagraphs")
    compiling.compiled(f, "g")
    assert seen[-1] == {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    monkeypatch.setattr(compiling, "_COMPILED", {})
    assert torch.equal(compiling.call(f, "h", (object(), torch.zeros(2)), "h"), torch.ones(2))
    assert list(compiling._COMPILED) == [("h", "cpu")]


@pytest.mark.parametrize("soft", [False, True])
def test_kernel_loss_is_the_autograd_loss_and_gradient(soft):
    """kernel_loss (the ConvNet kernel's hand-written backward behind loss.backward()): in float64 the loss and every
    parameter's gradient equal autograd's through the module to 1e-10 (relative), scaled by the incoming gradient; the
    images get no gradient."""
    from fedlatent.distill.kernels import kernel_loss, student_loss

    flat, _, _, x, y = _problem(spec="convnet-d3:width=6", n=8, size=8, soft=soft, seed=4)
    model = flat.model
    ref = student_loss(model(x), y)
    ref_g = torch.autograd.grad(3.0 * ref, list(model.parameters()))
    x = x.clone().requires_grad_(True)
    got = kernel_loss(make_kernel(FlatModel(model), "convnet"), model, x, y)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    got_g = torch.autograd.grad(3.0 * got, list(model.parameters()), retain_graph=True)
    assert all(a.shape == b.shape for a, b in zip(got_g, ref_g))
    # one relative error over all parameters (a conv bias before a norm has a zero gradient, rounding noise alone)
    assert _rel(torch.cat([a.flatten() for a in got_g]), torch.cat([b.flatten() for b in ref_g])) < 1e-10
    assert torch.autograd.grad(got, x, allow_unused=True)[0] is None


def test_kernel_loss_in_bf16_stays_within_tolerance():
    """kernel_loss with bf16 convolutions ('convnet-bf16', float32 model): the parameters' gradient within 5 %
    relative L2 of fp32 autograd's, the loss within 1 % (the tolerance the server training's 'fast' engine states),
    and it really ran in bf16 (it differs)."""
    from fedlatent.distill.kernels import kernel_loss, student_loss

    flat, _, _, x, y = _problem(spec="convnet-d3:width=16", n=32, size=16, seed=6)
    model = flat.model.float()
    x = x.float()
    ref = student_loss(model(x), y)
    ref_g = torch.cat([g.flatten() for g in torch.autograd.grad(ref, list(model.parameters()))])
    got = kernel_loss(make_kernel(FlatModel(model), "convnet-bf16"), model, x, y)
    got_g = torch.cat([g.flatten() for g in torch.autograd.grad(got, list(model.parameters()))])
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-2)
    assert 1e-5 < _rel(got_g, ref_g) < 0.05, _rel(got_g, ref_g)


def test_fit_on_set_with_a_kernel_engine_trains_as_autograd(digits16):
    """fit_on_set(engine='convnet') trains a ConvNet as autograd does (float64, DSA, momentum: parameters to 1e-9
    after 3 epochs); a model the kernel does not support (AlexNet) trains by autograd whatever the engine."""
    from fedlatent.train import fit_on_set

    def trained(spec, engine, dtype):
        torch.manual_seed(0)
        m = get_model(spec, 1, 10, 16).to(dtype)
        init = torch.cat([p.detach().flatten() for p in m.parameters()])
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        fit_on_set(m, digits16.x_train[:48].to(dtype), digits16.y_train[:48].long(), opt, epochs=3, batch_size=16,
                   augment=DSA(), generator=torch.Generator().manual_seed(1), engine=engine)
        return torch.cat([p.detach().flatten() for p in m.parameters()]) - init

    for spec, engine, dtype, lo, hi in (("convnet-d3:width=6", "convnet", torch.float64, 0.0, 1e-9),
                                        ("alexnet", "fast", torch.float64, 0.0, 0.0)):
        ref, got = trained(spec, "autograd", dtype), trained(spec, engine, dtype)
        assert ref.abs().max() > 0 and lo <= _rel(got, ref) <= hi, (spec, engine, _rel(got, ref))


def test_local_train_with_a_kernel_engine_trains_as_autograd(digits16, monkeypatch):
    """local_train(engine='convnet'): in float64 the client's parameters equal autograd's to 1e-9 after 2 epochs
    with a smaller last minibatch, momentum, weight decay and the FedProx term; a compiled kernel takes the full
    minibatches only (the last one runs by autograd); DP-SGD with a kernel engine is a clear error."""
    from fedlatent.distill import kernels
    from fedlatent.fl.client import local_train
    from fedlatent.train import engine_loss

    x, y = digits16.x_train[:40].double(), digits16.y_train[:40].long()

    def trained(engine):
        torch.manual_seed(0)
        m = get_model("convnet-d3:width=6", 1, 10, 16).double()
        g = {k: v.detach() + 0.01 for k, v in m.named_parameters()}
        local_train(m, x, y, epochs=2, lr=0.05, batch_size=16, momentum=0.9, weight_decay=5e-4, global_params=g,
                    mu=0.1, generator=torch.Generator().manual_seed(2), engine=engine)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    ref, got = trained("autograd"), trained("convnet")
    assert _rel(got, ref) < 1e-9

    sizes = []
    real_make = kernels.make_kernel

    def compiled_kernel(flat, engine):  # a kernel that says it is compiled (nothing compiles: kernel_loss is a spy)
        k = real_make(flat, "convnet")
        k.compiled = True
        return k

    monkeypatch.setattr(kernels, "make_kernel", compiled_kernel)
    monkeypatch.setattr(kernels, "kernel_loss", lambda k, m, xb, yb: sizes.append(len(xb)) or
                        kernels.student_loss(m(xb), yb))
    m = get_model("convnet-d3:width=6", 1, 10, 16).double()
    loss_fn = engine_loss(m, "convnet-compiled", 16)
    for n in (16, 8, 16):
        loss_fn(m, x[:n], y[:n])
    assert sizes == [16, 16]
    with pytest.raises(FedLatentError, match="DP-SGD.*'autograd'"):
        local_train(m, x, y, epochs=1, lr=0.1, batch_size=16, generator=torch.Generator(), privacy=object(),
                    engine="fast")


def test_other_models_use_the_autograd_kernel():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh(), nn.Linear(6, K)).double()
    flat = FlatModel(model)
    assert isinstance(make_kernel(flat), AutogradKernel)
    with pytest.raises(FedLatentError, match="convnet"):
        make_kernel(flat, "convnet")
    assert not ConvNetKernel.supports(get_model("convnet:width=4,norm=batchnorm", 3, K, 8))
    _, _, _, x, y = _problem()
    start = flat.flatten()
    target = start + 0.1
    plan = mtt.make_plan(8, 3, 8, seed=0)
    a = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, DSA(), mode="exact")
    b = mtt.meta_gradient(flat, start, target, x, y, LOG_LR, plan, DSA(), mode="unrolled")
    assert _rel(a.grad_images, b.grad_images) < 1e-8


def test_float32_exact_close_to_unrolled():
    flat, start, target, x, y = _problem(seed=4)
    flat = FlatModel(flat.model.float())
    args = (flat, start.float(), target.float(), x.float(), y, LOG_LR.float(), mtt.make_plan(8, 5, 8, seed=1), DSA())
    a = mtt.meta_gradient(*args, mode="exact")
    b = mtt.meta_gradient(*args, mode="unrolled", engine="autograd")
    assert a.grad_images.dtype == torch.float32
    assert _rel(a.grad_images, b.grad_images) < 1e-4


# -- errors ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    flat, start, target, x, y = _problem()
    plan = mtt.make_plan(8, 2, 8, seed=0)
    mg = mtt.meta_gradient
    with pytest.raises(FedLatentError, match="start parameters"):
        mg(flat, start[:-1], target, x, y, LOG_LR, plan)
    with pytest.raises(FedLatentError, match="target parameters"):
        mg(flat, start, torch.cat([target, target]), x, y, LOG_LR, plan)
    with pytest.raises(FedLatentError, match="identical"):
        mg(flat, start, start.clone(), x, y, LOG_LR, plan)
    with pytest.raises(FedLatentError, match="labels for"):
        mg(flat, start, target, x, y[:5], LOG_LR, plan)
    with pytest.raises(FedLatentError, match="out of range"):
        mg(flat, start, target, x[:4], y[:4], LOG_LR, plan)
    with pytest.raises(FedLatentError, match="mode"):
        mg(flat, start, target, x, y, LOG_LR, plan, mode="fast")
    with pytest.raises(FedLatentError, match="engine"):
        mg(flat, start, target, x, y, LOG_LR, plan, engine="cuda")
    with pytest.raises(FedLatentError, match="do not fit"):
        mg(flat, start, target, torch.randn(8, 1, 8, 8, dtype=torch.float64), y, LOG_LR, plan, engine="autograd")
    with pytest.raises(FedLatentError, match="NaN"):
        mg(flat, start, target, x * float("nan"), y, LOG_LR, plan)
    with pytest.raises(FedLatentError, match="batch_syn"):
        mtt.make_plan(8, 2, 9, seed=0)
    with pytest.raises(FedLatentError, match="syn_steps"):
        mtt.make_plan(8, 0, 8, seed=0)


def test_diverging_student_raises_non_finite():
    flat, start, target, x, y = _problem()
    with pytest.raises(FedLatentError, match="non-finite"):
        mtt.meta_gradient(flat, start, target, x * 1e3, y, torch.tensor(math.log(1e300), dtype=torch.float64),
                          mtt.make_plan(8, 6, 8, seed=0))


def test_init_synthetic_checks_ipc(digits16):
    imgs, labels = init_synthetic(digits16, 2, "real", seed=0)
    assert imgs.shape == (20, 1, 16, 16) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    for i in range(20):  # each image is a real training image of its class
        hits = (digits16.x_train == imgs[i]).flatten(1).all(1).nonzero().flatten()
        assert len(hits) >= 1 and int(digits16.y_train[hits[0]]) == int(labels[i])
    assert init_synthetic(digits16, 2, "noise", seed=1)[0].shape == (20, 1, 16, 16)
    with pytest.raises(FedLatentError, match="fewer than ipc"):
        init_synthetic(digits16, 1000)


# -- experts, sampler, loop --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_experts(digits16):
    from dataclasses import replace

    data = replace(digits16, x_train=digits16.x_train[:200], y_train=digits16.y_train[:200])
    trajs = train_experts("convnet:width=8,depth=2", data, num_experts=2, epochs=4, lr=0.01, batch_size=50,
                          seed=0, progress=False)
    return data, trajs


def test_experts_are_seeded_and_round_trip(tiny_experts, tmp_path):
    data, trajs = tiny_experts
    assert len(trajs) == 2 and trajs[0].shape[0] == 5
    assert not torch.equal(trajs[0][0], trajs[1][0])  # different initialisations
    assert (trajs[0][1:] - trajs[0][:-1]).norm(dim=1).min() > 0  # the weights move every epoch
    save_experts(tmp_path / "e.safetensors", trajs, {"arch": "x"})
    back, meta = load_experts(tmp_path / "e.safetensors")
    assert meta == {"arch": "x"} and all(torch.equal(a, b) for a, b in zip(trajs, back))
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(FedLatentError):
        load_experts(tmp_path / "junk.safetensors")


def test_trajectory_sampler_ranges_and_averaging(tiny_experts):
    _, trajs = tiny_experts
    s = TrajectorySampler(trajs, expert_epochs=2, max_start_epoch=10, seed=1)
    for it in range(30):
        a, b = s(it)
        hit = [(e, t) for e, tr in enumerate(trajs) for t in range(len(tr)) if torch.equal(tr[t], a)]
        e, t = hit[0]
        assert t < 3 and torch.equal(b, trajs[e][t + 2])  # start < min(10, 5 - 2)
    a1, b1 = s(7)
    a2, b2 = s(7)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    avg = TrajectorySampler(trajs, 2, 10, seed=1, average=(2, 3))
    a, b = avg(0)
    e, t = next((e, t) for e, tr in enumerate(trajs) for t in range(len(tr)) if torch.equal(tr[t], a))
    # the target is a mean of snapshots start+1..start+2: a convex combination of the two
    p1, p2 = trajs[e][t + 1], trajs[e][t + 2]
    w = float(((b - p2) @ (p1 - p2)) / ((p1 - p2) @ (p1 - p2)))
    assert torch.allclose(b, w * p1 + (1 - w) * p2, atol=1e-6) and 0 <= w <= 1
    with pytest.raises(FedLatentError, match="too short"):
        TrajectorySampler(trajs, expert_epochs=5, max_start_epoch=3)


def test_distiller_reduces_the_loss(tiny_experts):
    data, trajs = tiny_experts
    model = get_model("convnet:width=8,depth=2", 1, 10, 16)
    imgs, labels = init_synthetic(data, 1, "real", seed=0)
    syn = PixelSet(imgs)
    cfg = DistillConfig(syn_steps=5, expert_epochs=2, max_start_epoch=1, lr_img=100.0, lr_lr=0.0, dsa=False)
    d = Distiller(model, syn, labels, lambda it: (trajs[0][0], trajs[0][2]), cfg)
    d.run(25, progress=False)
    losses = [h.loss for h in d.history]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    assert not torch.equal(syn.images.detach(), imgs)


def test_distiller_learns_lr_and_soft_labels_and_restores_on_divergence(tiny_experts):
    data, trajs = tiny_experts
    model = get_model("convnet:width=8,depth=2", 1, 10, 16)
    imgs, labels = init_synthetic(data, 1, "noise", seed=0)
    soft = 3.0 * nn.functional.one_hot(labels, 10).float()
    syn = PixelSet(imgs)
    cfg = DistillConfig(syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_img=10.0, lr_lr=0.01, lr_label=1.0)
    d = Distiller(model, syn, soft, TrajectorySampler(trajs, 1, 2, seed=0), cfg)
    d.run(2, progress=False)
    assert d.lr != pytest.approx(0.01, rel=1e-9) and not torch.equal(d.labels.detach(), soft)
    good = syn.images.detach().clone()
    for gr in d.opt_img.param_groups:  # the next update overflows
        gr["lr"] = float("inf")
    with pytest.raises(FedLatentError, match="restored"):
        d.step()
    assert torch.equal(syn.images.detach(), good)


def test_evaluate_synthetic_is_seeded(tiny_experts):
    data, _ = tiny_experts
    imgs, labels = init_synthetic(data, 2, "real", seed=0)
    kw = dict(arch="convnet:width=8,depth=2", data=data, epochs=3, lr=0.01, seeds=(0, 1), progress=False, max_test=100)
    a = evaluate_synthetic(imgs, labels, **kw)
    b = evaluate_synthetic(imgs, labels, **kw)
    assert a == b and len(a["accs"]) == 2 and all(0 <= v <= 1 for v in a["accs"])
    with pytest.raises(FedLatentError):
        evaluate_synthetic(imgs, labels, **{**kw, "lr": float("nan")})


def test_cli_distill_pixels(tmp_path):
    import json

    from click.testing import CliRunner

    from fedlatent.cli import main

    args = ["distill-pixels", "--dataset", "digits", "--arch", "convnet:width=4,depth=2", "--ipc", "1",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "2",
            "--num-experts", "1", "--train-limit", "10", "--eval-epochs", "2", "--eval-seeds", "1", "--quiet",
            "--lr-img", "10"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert len(m["loss_history"]) == 2 and m["kernel"] == "convnet" and m["evaluation"]["accs"]
    assert (tmp_path / "o" / "grid.png").stat().st_size > 0
    assert "distill-pixels summary" in r.output and str(tmp_path / "o" / "grid.png") in r.output
    # reuse the experts; asking for more images per class than exist is a one-line error
    r = CliRunner().invoke(main, args + ["--experts", str(tmp_path / "o" / "experts.safetensors"), "--ipc", "50",
                                         "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "fewer than ipc" in r.output


def test_fast_engine_picks_by_device_and_machine(monkeypatch):
    """engine 'fast': bf16 + compile on a CPU with AVX-512-BF16 and a compiler, compiled fp32 without bf16, the plain
    kernel without a compiler, after a failed compilation, and on CUDA; make_kernel builds what it names."""
    flat = _problem()[0]
    for bf16, unavailable, failed, want, cdt in ((True, None, False, "convnet-bf16-compiled", torch.bfloat16),
                                                 (False, None, False, "convnet-compiled", None),
                                                 (True, None, True, "convnet", None),
                                                 (True, "no C++ compiler found (test)", False, "convnet", None)):
        monkeypatch.setattr(compiling, "compile_unavailable", lambda u=unavailable: u)
        monkeypatch.setitem(compiling.STATE, "failed", failed)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=bf16: b, raising=False)
        assert compiled.fast_engine("cpu") == want and compiled.fast_engine("cuda:0") == "convnet"
        k = make_kernel(flat, "fast")  # never an error: 'fast' degrades, an explicit '-compiled' engine raises
        assert k.compiled == want.endswith("compiled") and k.cdt == cdt
