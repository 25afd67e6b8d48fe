"""Autograd Functions around the fused kernels (compiled CUDA, or :class:`~fedlatent.ops.emulate.TorchKernels`).

Every Function here is differentiable to any order, and cheaply so, because each op's backward is itself
built from the same kernels or from differentiable PyTorch expressions:

* :class:`BiasAct` -> backward :class:`BiasActGrad` (``dx = dy * gain * slope(y)``), whose own backward is
  the same kernel again (the map ``dy -> dx`` is linear; its derivative w.r.t. ``y`` is zero almost
  everywhere);
* :class:`SgdStep` -> backward in PyTorch ops (``d theta = dout``, ``d g = -lr dout``, ``d lr = -g . dout``);
* :class:`TrajectoryLoss` -> a fused backward kernel when no graph is being built, the same formula in
  PyTorch ops under ``create_graph=True``;
* :class:`DsaPass` (affine in the images: linear plus the brightness offset) -> backward :class:`DsaPassT`
  (the adjoint of the linear part), whose backward is :class:`DsaPass` again with the brightness set to 0.

The kernels need contiguous buffers, but a Function always saves its *original* inputs (a ``.contiguous()``
copy of a non-contiguous input is a new tensor cut off from the graph: a double backward through it would
lose that input's terms); contiguous copies are made for the kernel calls only. ``bias_act`` keeps the
memory layout of a dense input (e.g. ``channels_last``) without copying: the kernel runs on the permuted view
that is contiguous, and the result is handed back in the input's dimension order.
"""
from __future__ import annotations

import torch
from torch.autograd import Function


def bias_layout(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(dim, channels, inner): ``x`` viewed as ``[outer, channels, inner]`` around dimension ``dim``."""
    dim = dim % x.ndim
    inner = 1
    for s in x.shape[dim + 1:]:
        inner *= int(s)
    return dim, int(x.shape[dim]), inner


def memory_order(x: torch.Tensor) -> list[int] | None:
    """The dimension order ``p`` in which ``x`` is laid out densely (``x.permute(p)`` is contiguous: ``[0, 2, 3,
    1]`` for ``channels_last``), the identity for a contiguous ``x``, None if ``x`` is not dense (strided slices)."""
    if x.is_contiguous():
        return list(range(x.ndim))
    order = sorted(range(x.ndim), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order).is_contiguous() else None


def in_order(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``t`` (contiguous, dimensions in ``order``) back in the original dimension order, sharing its memory.

    Not a ``permute`` view: an output of an autograd Function that is a view may not be modified in place, so
    the result is a fresh tensor over the same storage (the strides are those of ``t.permute(inverse)``)."""
    if order == sorted(order):
        return t
    inverse = sorted(range(len(order)), key=order.__getitem__)
    v = t.permute(inverse)
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), v.shape, v.stride())


class BiasAct(Function):
    @staticmethod
    def forward(ctx, x, b, dim: int, alpha: float, gain: float, kern):
        dim = dim % x.ndim
        order = memory_order(x)
        if order is None:  # not dense: one copy
            x, order = x.contiguous(), list(range(x.ndim))
        xp = x.permute(order)  # contiguous (a no-op for a contiguous x)
        _, channels, inner = bias_layout(xp, order.index(dim))
        y = in_order(kern.bias_act_fwd(xp, None if b is None else b.contiguous(), inner, channels, alpha, gain), order)
        ctx.save_for_backward(y)  # an output: the slope is read from its sign, x is not kept
        ctx.conf = (dim, alpha, gain, kern, b is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dim, alpha, gain, kern, has_b = ctx.conf
        dx = BiasActGrad.apply(dy, y, alpha, gain, kern)
        db = None
        if has_b and ctx.needs_input_grad[1]:
            db = dx.sum([d for d in range(dx.ndim) if d != dim])
        return (dx if ctx.needs_input_grad[0] else None), db, None, None, None, None


class BiasActGrad(Function):
    """``dx = dy * gain * slope(y)``, elementwise; ``dx`` in ``y``'s memory layout (which is dense)."""

    @staticmethod
    def forward(ctx, dy, y, alpha: float, gain: float, kern):
        ctx.save_for_backward(y)
        ctx.conf = (alpha, gain, kern)
        order = memory_order(y)
        if order is None:
            y, order = y.contiguous(), list(range(y.ndim))
        yp = y.permute(order)
        return in_order(kern.bias_act_bwd(dy.permute(order).contiguous(), yp, alpha, gain), order)

    @staticmethod
    def backward(ctx, ddx):
        (y,) = ctx.saved_tensors
        alpha, gain, kern = ctx.conf
        return BiasActGrad.apply(ddx, y, alpha, gain, kern), None, None, None, None


class SgdStep(Function):
    """``theta - lr * g``; ``lr`` a Python float or a one-element tensor of theta's dtype and device."""

    @staticmethod
    def forward(ctx, theta, g, lr, kern):
        is_t = torch.is_tensor(lr)
        out = kern.sgd_step(theta.contiguous(), g.contiguous(), lr.detach().reshape(()) if is_t else None,
                            0.0 if is_t else float(lr))
        ctx.save_for_backward(g, lr if is_t else None)
        ctx.lr = None if is_t else float(lr)
        return out

    @staticmethod
    def backward(ctx, dout):
        g, lr_t = ctx.saved_tensors
        lr = lr_t if lr_t is not None else ctx.lr
        need_th, need_g, need_lr = ctx.needs_input_grad[:3]
        dg = -lr * dout if need_g else None
        dlr = -(g * dout).sum().reshape(lr_t.shape) if (lr_t is not None and need_lr) else None
        return (dout if need_th else None), dg, dlr, None


class TrajectoryLoss(Function):
    @staticmethod
    def forward(ctx, e, s, t, kern):
        loss, stats = kern.traj_fwd(e.contiguous(), s.contiguous(), t.contiguous())
        ctx.save_for_backward(e, s, t, stats)  # the inputs themselves: the create_graph branch differentiates them
        ctx.kern = kern
        return loss

    @staticmethod
    def backward(ctx, go):
        e, s, t, stats = ctx.saved_tensors
        ne, ns, nt = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the same formula, differentiable
            num, den = (e - t).pow(2).sum(), (s - t).pow(2).sum()
            de = go * 2.0 * (e - t) / den
            ds = -go * 2.0 * num / den.pow(2) * (s - t)
            return (de if ne else None), (ds if ns else None), (-(de + ds) if nt else None), None
        de, ds, dt = ctx.kern.traj_bwd(go.contiguous(), stats, e.contiguous(), s.contiguous(), t.contiguous(),
                                       bool(ne), bool(ns), bool(nt))
        return de, ds, dt, None


class DsaPass(Function):
    @staticmethod
    def forward(ctx, x, params, flags: int, kern):
        ctx.save_for_backward(params)
        ctx.conf = (flags, kern)
        return kern.dsa_fwd(x.contiguous(), params, flags)

    @staticmethod
    def backward(ctx, dy):
        (params,) = ctx.saved_tensors
        flags, kern = ctx.conf
        return DsaPassT.apply(dy, params, flags, kern), None, None, None


class DsaPassT(Function):
    @staticmethod
    def forward(ctx, dy, params, flags: int, kern):
        ctx.save_for_backward(params)
        ctx.conf = (flags, kern)
        return kern.dsa_bwd(dy.contiguous(), params, flags)

    @staticmethod
    def backward(ctx, ddx):
        (params,) = ctx.saved_tensors
        flags, kern = ctx.conf
        linear = params.clone()
        linear[:, 0] = 0.0  # the adjoint of the adjoint is the LINEAR part of the pass: no brightness offset
        return DsaPass.apply(ddx, linear, flags, kern), None, None, None


__all__ = ["BiasAct", "BiasActGrad", "SgdStep", "TrajectoryLoss", "DsaPass", "DsaPassT", "bias_layout", "memory_order",
           "in_order"]
