"""Per-step kernels of the trajectory-matching engine: one student gradient and its second order.

A *step kernel* evaluates, for one student step on an (already augmented) batch ``x``,

* ``forward(theta, x, labels, keep)`` -> ``(loss, g, cache)`` with ``g = grad_theta loss``;
* ``rop(cache, u, need_theta)`` -> ``(H u, d s / d x, d s / d label_logits)`` where
  ``s = g . u`` (so ``H u`` is the Hessian-vector product and ``d s / d x = (d g / d x)^T u``).

That is all the meta-gradient needs: with ``u = -alpha v_{n+1}`` the adjoint recursion of MTT
(ALGORITHMS.md §1) is ``v_n = v_{n+1} + H_n u``, ``dX += (d g_n / d X)^T u``.

Two kernels:

* :class:`AutogradKernel` — any model, through PyTorch's double backward (``create_graph=True``, ``grad(g . u)``);
* :class:`ConvNetKernel` — the MTT/GLaD ConvNet (conv3x3 -> instance norm -> ReLU -> avg-pool,
  then linear), written out by hand: the forward pass, the backward pass and Pearlmutter's
  R-operator (forward-mode tangents of the forward *and* of the backward pass,
  ``Hu = R{grad_theta l}``, ``(dg/dx)^T u = R{grad_x l}`` by symmetry of mixed partials). It computes
  exactly the tensors the meta-gradient needs, fuses the two convolutions of each tangent into
  one call, runs in channels-last layout, skips every gradient nobody asks for, and keeps the
  per-layer elementwise work to a few passes (PyTorch's generic double backward of GroupNorm
  spends more time in elementwise kernels than in the convolutions).

``ConvNetKernel(compile=True)`` (engines ``convnet[-bf16]-compiled``) runs :meth:`forward` and :meth:`rop` through
``torch.compile`` (inductor fuses the norm / ReLU / pooling passes around the oneDNN convolutions).

bf16 convolutions (``conv_dtype=torch.bfloat16``, engines ``convnet-bf16[-compiled]``) mean bf16 operands, fp32
accumulation, bf16 results. Where the hardware has no bf16 arithmetic
(:func:`~fedlatent.distill.compiled.native_bf16`: a CPU without AVX-512-BF16), oneDNN's bf16 convolutions are a
slow fallback whose backward also rounds inside its sums (``benchmarks/bf16_conv.py``); there the kernel rounds the
operands to bf16, convolves in fp32 and rounds the result: the same numerics at fp32 speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import compiling
from ..errors import FedLatentError
from ..models.functional import FlatModel
from . import compiled


def student_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (int) or with soft labels given as logits (float).

    Soft labels (DynaFed): ``-mean_b sum_k softmax(labels)_bk log softmax(logits)_bk``.
    """
    if labels.dtype.is_floating_point:
        return -(torch.softmax(labels, 1) * torch.log_softmax(logits, 1)).sum(1).mean()
    return F.cross_entropy(logits, labels)


class AutogradKernel:
    """Generic kernel: autograd double backward through any :class:`FlatModel`."""

    name = "autograd"

    def __init__(self, flat: FlatModel):
        self.flat = flat

    def forward(self, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, keep: bool,
                need_grad: bool = True, lean: bool = False):
        soft = labels.dtype.is_floating_point
        th = theta.detach().requires_grad_(True)
        xx = x.detach().requires_grad_(keep)
        yy = labels.detach().requires_grad_(keep and soft)
        with torch.enable_grad():
            loss = student_loss(self.flat(th, xx), yy)
            (g,) = torch.autograd.grad(loss, th, create_graph=keep)
        cache = (th, xx, yy, g) if keep else None
        return loss.detach(), g.detach(), cache

    def rop(self, cache, u: torch.Tensor, need_theta: bool = True):
        th, xx, yy, g = cache
        soft = yy.requires_grad
        inputs = ([th] if need_theta else []) + [xx] + ([yy] if soft else [])
        with torch.enable_grad():
            s = (g * u).sum()
            grads = torch.autograd.grad(s, inputs, allow_unused=True)
        grads = [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads)]
        hu = grads.pop(0) if need_theta else None
        dx = grads.pop(0)
        dy = grads.pop(0) if soft else None
        return hu, dx, dy

    def recompute_rop(self, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, u: torch.Tensor,
                      need_theta: bool = True):
        """:meth:`rop` at a recomputed step: ``rop(forward(theta, x, labels, keep=True)[2], u)``."""
        return self.rop(self.forward(theta, x, labels, keep=True, need_grad=False)[2], u, need_theta)


# ------------------------------------------------------------------------------------------------
# Hand-written ConvNet kernel
# ------------------------------------------------------------------------------------------------
def pool_adjoint(grad: torch.Tensor, size) -> torch.Tensor:
    """Adjoint of 2x2 average pooling (stride 2, floor mode) onto maps of ``size`` (H, W): each input pixel gets
    a quarter of its window's gradient, and the row / column that floor mode drops gets zero. Written as a
    broadcast over channels-last views, so inductor indexes it by ``y // 2, x // 2`` instead of generating
    ``avg_pool2d_backward``'s general window loop. Bitwise equal to ATen's (``x * 0.25 == x / 4``)."""
    B, C, h, w = grad.shape
    H, W = size
    g = (grad * 0.25).permute(0, 2, 3, 1)[:, :, None, :, None, :]
    up = g.expand(B, h, 2, w, 2, C).reshape(B, 2 * h, 2 * w, C).permute(0, 3, 1, 2)
    return up if (H, W) == (2 * h, 2 * w) else F.pad(up, (0, W - 2 * w, 0, H - 2 * h))


@dataclass
class _Block:
    w: str
    b: str | None
    gamma: str | None  # instance-norm affine weight (None: no norm)
    beta: str | None
    eps: float
    pool: bool


def _conv_ok(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding == (1, 1) and m.padding_mode == "zeros")


class ConvNetKernel:
    """Hand-written forward / backward / R-operator of the ConvNet (see module docstring).

    Supported: ``features`` = repeated [Conv2d 3x3 pad 1, optional GroupNorm(C, C) (instance norm,
    affine), ReLU, optional AvgPool2d(2, 2)], then ``classifier`` = Linear on the flattened map.
    :meth:`supports` tells whether a module qualifies; the engine falls back to
    :class:`AutogradKernel` otherwise.
    """

    name = "convnet"

    def __init__(self, flat: FlatModel, channels_last: bool = True, groups: int = 1,
                 conv_dtype: torch.dtype | None = None, compile: bool = False):
        blocks = self.parse(flat.model)
        if blocks is None:
            raise ValueError("model is not a supported ConvNet")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.flat, self.blocks = flat, blocks
        self.fc_w, self.fc_b = "classifier.weight", "classifier.bias"
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.G = int(groups)
        # mixed precision: the convolutions' operands in conv_dtype (e.g. bfloat16, fp32 accumulation in oneDNN /
        # cuDNN), every other tensor (norms, softmax, the flat vectors) in the caller's dtype
        self.cdt = conv_dtype
        dev = next(flat.model.parameters()).device
        self.emulate = conv_dtype == torch.bfloat16 and not compiled.native_bf16(dev)  # bf16-rounded fp32 convolutions
        # torch.compile'd forward / rop (shared by every kernel: same architecture and shapes, no recompilation)
        if compile:
            compiling.require("the compiled ConvNet kernel", " (use the engine without '-compiled')")
        self.compiled = bool(compile) and not compiling.STATE["failed"]

    def _conv(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.cdt is None or self.cdt == x.dtype:
            return F.conv2d(x, W, b, padding=1, groups=self.G)
        z = self._result(F.conv2d(self._operand(x), self._operand(W), None, padding=1, groups=self.G), x.dtype)
        return z if b is None else z.add_(b.view(1, -1, 1, 1))

    def _conv_bwd(self, grad: torch.Tensor, x: torch.Tensor, W: torch.Tensor, mask: list[bool]):
        """(d input, d weight, d bias) of the 3x3 pad-1 convolution, as ``mask`` asks."""
        if self.cdt is None or self.cdt == x.dtype:
            return torch.ops.aten.convolution_backward(grad, x, W, [W.shape[0]] if mask[2] else None, [1, 1], [1, 1],
                                                       [1, 1], False, [0, 0], self.G, mask)
        gi, gw, _ = torch.ops.aten.convolution_backward(self._operand(grad), self._operand(x), self._operand(W), None,
                                                        [1, 1], [1, 1], [1, 1], False, [0, 0], self.G,
                                                        [mask[0], mask[1], False])
        return (None if gi is None else self._result(gi, x.dtype), None if gw is None else self._result(gw, x.dtype),
                grad.sum((0, 2, 3)) if mask[2] else None)

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        """A convolution operand in ``conv_dtype``; emulated (:attr:`emulate`): rounded to it, kept in ``t``'s dtype."""
        return t.to(self.cdt).to(t.dtype) if self.emulate else t.to(self.cdt)

    def _result(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A convolution's result rounded to ``conv_dtype`` (a no-op where it was computed in it), in ``dtype``."""
        return t.to(self.cdt).to(dtype)

    @staticmethod
    def parse(model: nn.Module) -> list[_Block] | None:
        feats, cls = getattr(model, "features", None), getattr(model, "classifier", None)
        if not isinstance(feats, nn.Sequential) or not isinstance(cls, nn.Linear) or cls.bias is None:
            return None
        if type(model).forward is not _convnet_forward():
            return None
        mods = list(feats.named_children())
        blocks: list[_Block] = []
        i = 0
        while i < len(mods):
            name, m = mods[i]
            if not _conv_ok(m) or m.bias is None:
                return None
            blk = _Block(f"features.{name}.weight", f"features.{name}.bias", None, None, 0.0, False)
            i += 1
            if i < len(mods) and isinstance(mods[i][1], nn.GroupNorm):
                gn = mods[i][1]
                if gn.num_groups != gn.num_channels or not gn.affine:
                    return None
                blk.gamma, blk.beta, blk.eps = f"features.{mods[i][0]}.weight", f"features.{mods[i][0]}.bias", gn.eps
                i += 1
            if i >= len(mods) or not isinstance(mods[i][1], nn.ReLU):
                return None
            i += 1
            if i < len(mods) and isinstance(mods[i][1], nn.AvgPool2d):
                p = mods[i][1]
                if p.kernel_size not in (2, (2, 2)) or p.stride not in (2, (2, 2)) or p.padding not in (0, (0, 0)) \
                        or p.ceil_mode or p.divisor_override is not None:
                    return None
                blk.pool = True
                i += 1
            blocks.append(blk)
        return blocks or None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls.parse(model) is not None

    # -- helpers ---------------------------------------------------------------------------------
    def _cl(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=self.fmt)

    @staticmethod
    def _pool_t(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Adjoint of 2x2 average pooling (its own tangent is the pooling itself): eager, ATen's
        ``avg_pool2d_backward``; under ``torch.compile``, :func:`pool_adjoint`, the same map, which inductor
        generates and compiles about a third faster (RESULTS.md, "the pooling adjoint as a broadcast")."""
        if torch.compiler.is_compiling():
            return pool_adjoint(grad, like.shape[-2:])
        return torch.ops.aten.avg_pool2d_backward(grad, like, [2, 2], [2, 2], [0, 0], False, True, None)

    def _flatten_grads(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.G == 1:
            return torch.cat([grads[n].reshape(-1) for n in self.flat.names])
        return torch.cat([grads[n].reshape(self.G, -1) for n in self.flat.names], 1)

    # -- the grouped layout (G students as one network) ---------------------------------------------
    # Student k's channel c of a feature map is channel k C + c of one map [B, G C, H, W]: convolutions are
    # grouped (groups = G), instance norm, ReLU and pooling act per channel anyway, and the classifier is a
    # batched matmul over [G, B, F]. The loss is the sum of the G students' losses: its gradient and Hessian are
    # block-diagonal, so each block is exactly the single student's.
    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.G == 1:
            return self.flat.params(theta)
        G = self.G
        if theta.shape != (G, self.flat.numel):
            raise ValueError(f"grouped kernel needs [{G}, {self.flat.numel}] parameters, got {tuple(theta.shape)}")
        out, i = {}, 0
        for n, sh, k in zip(self.flat.names, self.flat.shapes, self.flat.numels):
            t = theta[:, i: i + k]
            out[n] = t.reshape(G, *sh) if n in (self.fc_w, self.fc_b) else t.reshape(G * sh[0], *sh[1:])
            i += k
        return out

    def _cat_ch(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Channel concatenation per group: [a_k, b_k] for every student k."""
        if self.G == 1:
            return torch.cat([a, b], 1)
        B, _, H, W = a.shape
        return torch.cat([a.view(B, self.G, -1, H, W), b.view(B, self.G, -1, H, W)], 2).view(B, -1, H, W)

    def _cat_out(self, W: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Output-channel concatenation of two grouped weights, per group."""
        if self.G == 1:
            return torch.cat([W, U], 0)
        return torch.cat([W.view(self.G, -1, *W.shape[1:]), U.view(self.G, -1, *U.shape[1:])], 1).view(
            -1, *W.shape[1:])

    def _feat(self, a: torch.Tensor) -> torch.Tensor:
        return a.flatten(1) if self.G == 1 else a.reshape(a.shape[0], self.G, -1).transpose(0, 1)

    def _unfeat(self, d: torch.Tensor, shape) -> torch.Tensor:
        return self._cl(d.view(shape) if self.G == 1 else d.transpose(0, 1).reshape(shape))

    def _to_maps(self, x: torch.Tensor) -> torch.Tensor:
        """[G, B, C, H, W] -> [B, G C, H, W] (grouped); unchanged for one student."""
        if self.G == 1:
            return x
        G, B = x.shape[:2]
        return x.transpose(0, 1).reshape(B, G * x.shape[2], *x.shape[3:])

    def _from_maps(self, d: torch.Tensor) -> torch.Tensor:
        if self.G == 1:
            return d
        B, GC, H, W = d.shape
        return d.view(B, self.G, GC // self.G, H, W).transpose(0, 1)

    # -- compiled dispatch -------------------------------------------------------------------------
    def forward(self, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, keep: bool,
                need_grad: bool = True, lean: bool = False):
        """Loss, flat gradient and (``keep``) the tensors the R-operator needs (see :meth:`_forward`). ``x`` is made
        contiguous first (augmentations return either layout; a compiled kernel would compile once per layout)."""
        return self._run("_forward", theta, x.contiguous(), labels, keep, need_grad, lean)

    def rop(self, cache, u: torch.Tensor, need_theta: bool = True):
        """``(H u, (d g / d x)^T u, d s / d label_logits)`` (see :meth:`_rop`)."""
        return self._run("_rop", cache, u, need_theta)

    def recompute_rop(self, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, u: torch.Tensor,
                      need_theta: bool = True):
        """:meth:`rop` at a recomputed step (the exact adjoint walk's step), the forward and the R-operator as one
        function: compiled, one graph, so the kept activations never leave it."""
        return self._run("_recompute_rop", theta, x.contiguous(), labels, u, need_theta)

    def _recompute_rop(self, theta, x, labels, u, need_theta: bool):
        """:meth:`_rop` of :meth:`_forward`'s cache (``keep=True``, no weight gradient), the function compiled."""
        return self._rop(self._forward(theta, x, labels, True, False)[2], u, need_theta)

    def _run(self, name: str, *args):
        return compiled.run(self, getattr(ConvNetKernel, name), name, args) if self.compiled else \
            getattr(ConvNetKernel, name)(self, *args)

    # -- forward + backward ----------------------------------------------------------------------
    def _forward(self, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, keep: bool,
                 need_grad: bool = True, lean: bool = False):
        """Loss, flat gradient and (``keep``) the tensors the R-operator needs.

        ``need_grad=False`` skips the weight gradients (the exact backward walk already has g_n);
        ``lean`` keeps fewer tensors (recomputed in :meth:`rop`; for the unrolled mode).

        Instance norm backward, per (sample, channel) over the H*W positions:
        ``dz = rs * gamma * (dn - mean(dn) - xh * mean(xh dn))`` with ``rs = 1/sigma``.
        """
        P = self._params(theta.detach())
        G = self.G
        a = self._cl(self._to_maps(x.detach()))
        layers: list[dict] = []
        for blk in self.blocks:
            W = P[blk.w]
            z = self._conv(a, W, P[blk.b])
            B, C, H, Wd = z.shape
            L = {"a": a}
            if blk.gamma is not None:
                xh, _, rs = torch.ops.aten.native_group_norm(z, None, None, B, C, H * Wd, C, blk.eps)
                del z
                L["xh"], L["rs"] = xh, rs.view(B, C, 1, 1)
                n = torch.addcmul(P[blk.beta].view(1, -1, 1, 1), xh, P[blk.gamma].view(1, -1, 1, 1))
            else:
                n = z
            L["n"] = n
            r = torch.relu(n)
            a = F.avg_pool2d(r, 2) if blk.pool else r
            layers.append(L)
        feat = self._feat(a)
        Wfc, bfc = P[self.fc_w], P[self.fc_b]
        if G == 1:
            logits = torch.addmm(bfc, feat, Wfc.t())
        else:
            logits = torch.baddbmm(bfc.unsqueeze(1), feat, Wfc.transpose(1, 2))
        B = logits.shape[-2]
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        if labels.dtype.is_floating_point:
            q = torch.softmax(labels.detach(), -1)
            loss = -(q * logp).sum(-1).mean(-1)
            dlogits = (p - q) / B
        else:
            q = None
            dlogits = p.clone()
            if G == 1:
                loss = F.nll_loss(logp, labels)
                dlogits[torch.arange(B, device=p.device), labels] -= 1.0
            else:
                idx = labels.unsqueeze(-1)
                loss = -logp.gather(-1, idx).squeeze(-1).mean(-1)
                dlogits.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=p.dtype, device=p.device))
            dlogits /= B
        grads: dict[str, torch.Tensor] = {}
        if need_grad:
            grads = {self.fc_w: dlogits.transpose(-1, -2) @ feat, self.fc_b: dlogits.sum(-2)}
        da = self._unfeat(dlogits @ Wfc, a.shape)
        for li in range(len(self.blocks) - 1, -1, -1):
            blk, L = self.blocks[li], layers[li]
            L["dout"] = da
            n = L["n"]
            dn = torch.ops.aten.threshold_backward(self._pool_t(da, n) if blk.pool else da, n, 0)
            if blk.gamma is not None:
                xh, rs = L["xh"], L["rs"]
                hw = xh.shape[2] * xh.shape[3]
                m0 = dn.mean((2, 3), keepdim=True)
                m1 = (xh * dn).mean((2, 3), keepdim=True)
                if need_grad:
                    grads[blk.gamma] = m1.sum(0).view(-1) * hw
                    grads[blk.beta] = m0.sum(0).view(-1) * hw
                gr = P[blk.gamma].view(1, -1, 1, 1) * rs
                dz = torch.addcmul(dn - m0, xh, m1, value=-1.0).mul_(gr)
                L["m0"], L["m1"] = m0, m1
                if not lean:
                    L["dn"] = dn
            else:
                dz = dn
            L["dz"] = None if lean else dz  # lean: recomputed in rop from dout (3-4 elementwise passes)
            W = P[blk.w]
            if li > 0 or need_grad:
                gin, gw, gb = self._conv_bwd(dz, L["a"], W, [li > 0, need_grad, need_grad])
                if need_grad:
                    grads[blk.w], grads[blk.b] = gw, gb
                da = gin
        g = self._flatten_grads(grads) if need_grad else None
        cache = None
        if keep:
            cache = {"layers": layers, "feat": feat, "p": p, "q": q, "dlogits": dlogits, "theta": theta.detach(),
                     "a_last_shape": a.shape}
        return loss.detach(), g, cache

    # -- R-operator --------------------------------------------------------------------------------
    def _rop(self, cache, u: torch.Tensor, need_theta: bool = True):
        """Pearlmutter's R-operator in direction ``u``: tangents of the forward pass, then of the
        backward pass. ``R{grad_theta l} = H u`` and ``R{grad_x l} = (d g / d x)^T u``.

        Instance norm (per sample and channel over H*W; ``xh`` normalised, ``rs = 1/sigma``,
        ``P(w) = w - mean(w) - xh mean(xh w)``): the forward tangent is ``xh' = rs P(z')`` and
        ``sigma'/sigma = rs k`` with ``k = mean(xh z')``; the backward ``dz = rs gamma P(dn)`` has the
        tangent ``dz' = rs [gamma P(dn') + gamma' P(dn) - gamma (xh' mean(xh dn) + xh mean(xh' dn))]
        - k rs dz``. ReLU's second derivative is zero almost everywhere: its tangent is its mask.
        """
        P = self._params(cache["theta"])
        U = self._params(u.detach().to(cache["theta"].dtype))
        G = self.G
        layers = cache["layers"]
        adot = None
        for li, blk in enumerate(self.blocks):
            L = layers[li]
            a_in, n = L["a"], L["n"]
            if adot is None:
                zdot = self._conv(a_in, U[blk.w], U[blk.b])
            else:  # conv(adot, W) + conv(a, U_W) as one convolution over stacked input channels
                zdot = self._conv(self._cl(self._cat_ch(adot, a_in)), torch.cat([P[blk.w], U[blk.w]], 1), U[blk.b])
            L["adot_in"] = adot
            if blk.gamma is not None:
                xh, rs = L["xh"], L["rs"]
                k = (xh * zdot).mean((2, 3), keepdim=True)
                xhdot = torch.addcmul(zdot.sub_(zdot.mean((2, 3), keepdim=True)), xh, k, value=-1.0).mul_(rs)
                del zdot
                L["k"], L["xhdot"] = k, xhdot
                ndot = torch.addcmul(U[blk.beta].view(1, -1, 1, 1), xh, U[blk.gamma].view(1, -1, 1, 1))
                ndot.addcmul_(xhdot, P[blk.gamma].view(1, -1, 1, 1))
            else:
                ndot = zdot
            rdot = torch.ops.aten.threshold_backward(ndot, n, 0)
            del ndot
            adot = F.avg_pool2d(rdot, 2) if blk.pool else rdot
        feat, p, q, dlogits = cache["feat"], cache["p"], cache["q"], cache["dlogits"]
        B = p.shape[-2]
        Wfc = P[self.fc_w]
        featdot = self._feat(adot)
        ub = U[self.fc_b] if G == 1 else U[self.fc_b].unsqueeze(1)
        ldot = featdot @ Wfc.transpose(-1, -2) + feat @ U[self.fc_w].transpose(-1, -2) + ub
        pdot = p * (ldot - (p * ldot).sum(-1, keepdim=True))
        dlogits_dot = pdot / B
        dlab = None
        if q is not None:  # d s / d label_logits through q = softmax(labels): ds/dq = -ldot / B
            w = -ldot / B
            dlab = q * (w - (q * w).sum(-1, keepdim=True))
        grads: dict[str, torch.Tensor] = {}
        if need_theta:
            grads[self.fc_w] = dlogits_dot.transpose(-1, -2) @ feat + dlogits.transpose(-1, -2) @ featdot
            grads[self.fc_b] = dlogits_dot.sum(-2)
        dadot = self._unfeat(dlogits_dot @ Wfc + dlogits @ U[self.fc_w], cache["a_last_shape"])
        for li in range(len(self.blocks) - 1, -1, -1):
            blk, L = self.blocks[li], layers[li]
            a_in, n, dz, adot_in = L["a"], L["n"], L["dz"], L["adot_in"]
            dndot = torch.ops.aten.threshold_backward(self._pool_t(dadot, n) if blk.pool else dadot, n, 0)
            dn = L.get("dn")
            if dn is None and (dz is None or blk.gamma is not None):
                dout = L["dout"]
                dn = torch.ops.aten.threshold_backward(self._pool_t(dout, n) if blk.pool else dout, n, 0)
            if blk.gamma is not None:
                xh, xhdot, rs, k, m0, m1 = L["xh"], L["xhdot"], L["rs"], L["k"], L["m0"], L["m1"]
                hw = xh.shape[2] * xh.shape[3]
                g_, ug = P[blk.gamma].view(1, -1, 1, 1), U[blk.gamma].view(1, -1, 1, 1)
                if dz is None:
                    dz = torch.addcmul(dn - m0, xh, m1, value=-1.0).mul_(g_ * rs)
                m0d = dndot.mean((2, 3), keepdim=True)
                m1d = (xh * dndot).mean((2, 3), keepdim=True)
                e = (xhdot * dn).mean((2, 3), keepdim=True)
                if need_theta:
                    grads[blk.gamma] = (m1d.sum(0) + e.sum(0)).view(-1) * hw
                    grads[blk.beta] = m0d.sum(0).view(-1) * hw
                # dzdot = rs [g dndot + ug dn - g m1 xhdot - xh (g m1d + ug m1 + g e) - (g m0d + ug m0)] - k rs dz
                dzdot = dndot.mul_(g_ * rs).addcmul_(dn, ug * rs)
                del dn
                dzdot.addcmul_(xhdot, g_ * m1 * rs, value=-1.0)
                dzdot.addcmul_(xh, (g_ * m1d + ug * m1 + g_ * e) * rs, value=-1.0)
                dzdot.sub_((g_ * m0d + ug * m0) * rs).addcmul_(dz, k * rs, value=-1.0)
            else:
                dzdot = dndot
                dz = dn if dz is None else dz
            W, UW = P[blk.w], U[blk.w]
            if need_theta:
                if adot_in is None:
                    _, gw, gb = self._conv_bwd(dzdot, a_in, W, [False, True, True])
                else:  # corr(adot, dz) + corr(a, dzdot) as one weight gradient over a doubled batch
                    _, gw, _ = self._conv_bwd(torch.cat([dz, dzdot], 0), torch.cat([adot_in, a_in], 0), W,
                                              [False, True, False])
                    gb = dzdot.sum((0, 2, 3))
                grads[blk.w], grads[blk.b] = gw, gb
            # input tangent: convT(dzdot, W) + convT(dz, U_W)
            if li == 0:  # 3-channel output: two calls beat stacking two large maps
                gin = self._conv_bwd(dzdot, a_in, W, [True, False, False])[0]
                gin += self._conv_bwd(dz, a_in, UW, [True, False, False])[0]
            else:
                gin = self._conv_bwd(self._cl(self._cat_ch(dzdot, dz)), a_in, self._cat_out(W, UW),
                                     [True, False, False])[0]
            dadot = gin
        hu = self._flatten_grads(grads) if need_theta else None
        return hu, self._from_maps(dadot), dlab


def _convnet_forward():
    from ..models import ConvNet

    return ConvNet.forward


class _KernelLoss(torch.autograd.Function):
    """A module's student loss through a step kernel: the forward is the kernel's loss at the module's current
    parameters, the backward hands the kernel's flat gradient ``g`` (times the incoming gradient) to the parameters,
    which ``loss.backward()`` would compute by autograd."""

    @staticmethod
    def forward(ctx, kernel, x, labels, *params):
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        loss, g, _ = kernel.forward(theta, x.detach(), labels.detach(), keep=False)
        ctx.save_for_backward(g)
        ctx.shapes = [p.shape for p in params]
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        g = g * grad
        outs, i = [], 0
        for sh in ctx.shapes:
            k = sh.numel()
            outs.append(g[i: i + k].view(sh))
            i += k
        return (None, None, None, *outs)


def kernel_loss(kernel: "ConvNetKernel", model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`student_loss` of ``model`` on ``(x, labels)`` whose ``backward()`` takes the gradient from ``kernel``
    (a :class:`ConvNetKernel` of this model: the hand-written backward, optionally compiled / bf16) instead of
    autograd; ``x`` gets no gradient. The training loop's shortcut (:func:`fedlatent.train.fit_on_set` ``engine``)."""
    return _KernelLoss.apply(kernel, x, labels, *model.parameters())


#: ConvNet engine name -> (the convolutions' operand dtype (None: the inputs' dtype), torch.compile'd)
CONVNET_ENGINES = {"convnet": (None, False), "convnet-bf16": (torch.bfloat16, False),
                   "convnet-compiled": (None, True), "convnet-bf16-compiled": (torch.bfloat16, True)}
ENGINES = ("auto", "fast", *CONVNET_ENGINES, "autograd")

def make_kernel(flat: FlatModel, engine: str = "auto", groups: int = 1):
    """``engine``: 'auto' (hand-written ConvNet kernel when the model qualifies), 'convnet', 'convnet-bf16' (bf16
    convolution operands, fp32 accumulation, the rest in the inputs' dtype: fast on AVX-512-BF16 / AMX CPUs and
    recent GPUs), 'convnet[-bf16]-compiled' (under ``torch.compile``; the first call compiles for a minute or
    two), 'fast' (the fastest of these measured on the model's device, :func:`compiled.fast_engine`), 'autograd'.

    ``groups > 1``: ``groups`` students of this model as one grouped ConvNet (:class:`ConvNetKernel`), for the
    batched multi-client path; None when the engine or the model has no grouped kernel (the caller vmaps)."""
    if engine not in ENGINES:
        raise FedLatentError(f"unknown MTT engine {engine!r} ({', '.join(ENGINES)})")
    if engine == "fast":  # any other model: the autograd kernel, as 'auto'
        ok = ConvNetKernel.supports(flat.model)
        engine = compiled.fast_engine(next(flat.model.parameters()).device) if ok else "auto"
    if engine == "autograd":
        return AutogradKernel(flat) if groups == 1 else None
    if ConvNetKernel.supports(flat.model):
        dtype, comp = CONVNET_ENGINES.get(engine, (None, False))
        return ConvNetKernel(flat, groups=groups, conv_dtype=dtype, compile=comp)
    if engine.startswith("convnet"):
        raise FedLatentError(f"the {engine!r} engine needs a ConvNet (conv-instancenorm-relu-avgpool); "
                             f"got {type(flat.model).__name__}")
    return AutogradKernel(flat) if groups == 1 else None


__all__ = ["student_loss", "AutogradKernel", "ConvNetKernel", "make_kernel", "kernel_loss", "ENGINES"]
