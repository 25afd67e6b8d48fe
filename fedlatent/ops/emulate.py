"""The CUDA kernels' contracts, re-stated in plain PyTorch (any device, any float dtype).

:class:`TorchKernels` has the same entry points, arguments and results as the compiled extension
(``fedlatent_ops.cpp``) and computes what each kernel computes -- the same closed forms (e.g. the colour
transform of DSA in one expression, its adjoint written out), not the reference's op-by-op composition.
With :func:`fedlatent.ops.emulate` the fused autograd Functions run on these, so the Functions' forward/
backward/double-backward wiring and the kernels' formulas are tested against the reference on a machine
without a GPU; only the CUDA code itself (indexing, reductions) then remains for a GPU run to check.
"""
from __future__ import annotations

import torch

DSA_PARAMS = 10  # brightness, saturation, contrast, shift_h, shift_w, cut_top, cut_left, cut_h, cut_w, flip
COLOR, CROP, CUTOUT, FLIP = 1, 2, 4, 8


class TorchKernels:
    """Pure-PyTorch stand-in for the compiled ``fedlatent_ops`` module."""

    DSA_PARAMS = DSA_PARAMS
    name = "emulated"

    # -- bias + leaky ReLU + gain ---------------------------------------------------------------
    @staticmethod
    def bias_act_fwd(x, b, inner: int, channels: int, alpha: float, gain: float):
        v = x.reshape(-1, channels, inner)
        if b is not None:
            v = v + b.view(1, channels, 1)
        v = torch.where(v > 0, v, v * alpha)
        y = torch.empty_like(x)  # a fresh tensor, as the kernel's (a reshape would return a view)
        torch.mul(v, gain, out=y.view(-1, channels, inner))
        return y

    @staticmethod
    def bias_act_bwd(dy, y, alpha: float, gain: float):
        g = dy * gain
        return torch.where(y > 0, g, g * alpha)

    # -- SGD step --------------------------------------------------------------------------------
    @staticmethod
    def sgd_step(theta, g, lr_tensor, lr: float):
        a = lr_tensor.reshape(()) if lr_tensor is not None else lr
        return theta - a * g

    # -- trajectory loss -------------------------------------------------------------------------
    @staticmethod
    def traj_fwd(e, s, t):
        td = t.double()
        num = (e.double() - td).pow(2).sum()
        den = (s.double() - td).pow(2).sum()
        stats = torch.stack([num, den])
        return [(num / den).to(t.dtype), stats]

    @staticmethod
    def traj_bwd(go, stats, e, s, t, need_e: bool, need_s: bool, need_t: bool):
        g = go.double().reshape(()) if go is not None else torch.ones((), dtype=torch.float64, device=t.device)
        num, den = stats[0], stats[1]
        ce = (2.0 * g / den).to(t.dtype)
        cs = (-2.0 * g * num / (den * den)).to(t.dtype)
        de = ce * (e - t)
        ds = cs * (s - t)
        return [de if need_e else None, ds if need_s else None, -(de + ds) if need_t else None]

    # -- fused DSA (colour -> crop -> cutout -> flip) ----------------------------------------------
    @staticmethod
    def _maps(params, flags: int, B: int, H: int, W: int, device):
        """For every output pixel: the flat index of the source pixel and whether it is kept, [B, H*W]."""
        p = params.to(device)
        i = torch.arange(H, device=device).view(1, H, 1)
        j = torch.arange(W, device=device).view(1, 1, W)
        sh = p[:, 3].long().view(-1, 1, 1) if flags & CROP else torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        sw = p[:, 4].long().view(-1, 1, 1) if flags & CROP else torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        flip = ((p[:, 9] != 0) & bool(flags & FLIP)).view(-1, 1, 1)
        j1 = torch.where(flip, W - 1 - j, j)
        keep = torch.ones(p.shape[0], H, W, dtype=torch.bool, device=device)
        if flags & CUTOUT:
            top, left = p[:, 5].long().view(-1, 1, 1), p[:, 6].long().view(-1, 1, 1)
            ch, cw = p[:, 7].long().view(-1, 1, 1), p[:, 8].long().view(-1, 1, 1)
            keep = keep & ~((i >= top) & (i < top + ch) & (j1 >= left) & (j1 < left + cw))
        si, sj = i + sh, j1 + sw
        keep = keep & (si >= 0) & (si < H) & (sj >= 0) & (sj < W)
        src = torch.where(keep, si * W + sj, torch.zeros_like(si))
        return src.reshape(-1, H * W).expand(B, H * W), keep.reshape(-1, H * W).expand(B, H * W)

    @staticmethod
    def _coef(params, x):
        p = params.to(device=x.device, dtype=x.dtype)
        return p[:, 0].view(-1, 1, 1, 1), p[:, 1].view(-1, 1, 1, 1), p[:, 2].view(-1, 1, 1, 1)

    @classmethod
    def dsa_fwd(cls, x, params, flags: int):
        B, C, H, W = x.shape
        if flags & COLOR:
            bright, sat, con = cls._coef(params, x)
            mc = x.mean(1, keepdim=True)
            m = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mc) * sat + mc - m) * con + m + bright
        src, keep = cls._maps(params, flags, B, H, W, x.device)
        z = x.reshape(B, C, H * W).gather(2, src.unsqueeze(1).expand(B, C, H * W))
        return (z * keep.unsqueeze(1).to(x.dtype)).reshape(B, C, H, W)

    @classmethod
    def dsa_bwd(cls, dy, params, flags: int):
        B, C, H, W = dy.shape
        src, keep = cls._maps(params, flags, B, H, W, dy.device)
        d = (dy.reshape(B, C, H * W) * keep.unsqueeze(1).to(dy.dtype))
        dz = torch.zeros_like(d).scatter_add_(2, src.unsqueeze(1).expand(B, C, H * W), d).reshape(B, C, H, W)
        if not flags & COLOR:
            return dz
        _, sat, con = cls._coef(params, dy)
        return (con * sat * dz + con * (1 - sat) / C * dz.sum(1, keepdim=True)
                + (1 - con) / (C * H * W) * dz.sum((1, 2, 3), keepdim=True))


__all__ = ["TorchKernels", "DSA_PARAMS", "COLOR", "CROP", "CUTOUT", "FLIP"]
