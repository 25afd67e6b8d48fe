"""fedlatent's own compact class-conditional style generator (small enough to train on a CPU).

Same structure as StyleGAN-XL's generator, so the latent spaces F_k mean the same thing
(:class:`fedlatent.generators.base.LayeredGenerator` wraps both):

* ``G.mapping(z, c)``: ``z`` and a class embedding (a linear map of the one-hot label), each normalised to unit
  second moment (StyleGAN's pixel norm), concatenated, then a few fully-connected leaky-ReLU layers -> ``w``,
  broadcast to ``num_ws`` copies. A per-class running mean of ``w`` (``w_avg``) allows truncation.
* ``G.synthesis.input(w0)``: a learned constant ``[C, s0, s0]`` scaled channel-wise by an affine map of ``w0``.
* ``G.synthesis.layer_names``: modulated 3x3 convolutions (StyleGAN2, Karras et al. 2020, Eq. 1-3: weight
  modulation by styles ``s = A(w)`` and demodulation ``1/sqrt(sum_{i,k} (s_i w_{oik})^2 + eps)``); every second
  layer upsamples 2x (bilinear) before its convolution; the last layer is a 1x1 modulated "toRGB" convolution
  without demodulation or activation. Optional per-layer noise (off by default, so rendering is deterministic).

Layouts (:func:`layout`): 16 px (4 -> 8 -> 16), 32 px (4 -> 8 -> 16 -> 32), 28 px (7 -> 14 -> 28), any
start * 2**n px (start 4..7). All weights use StyleGAN's equalised learning rate (stored ~N(0, 1), scaled by
1/sqrt(fan_in) at run time).

Checkpoints are safetensors files; the generator config (JSON) and training information live in the
file's metadata (never pickle). :func:`save_builtin` / :func:`load_builtin`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..utils import FedLatentError, save_safetensors
from .base import LayeredGenerator

CHECKPOINT_FORMAT = "fedlatent-builtin-style-generator"
CHECKPOINT_VERSION = "1"


@dataclass
class BuiltinConfig:
    """Hyper-parameters of :class:`BuiltinStyleGenerator` (stored in every checkpoint)."""

    img_resolution: int = 32
    img_channels: int = 1
    c_dim: int = 10
    z_dim: int = 64
    w_dim: int = 128
    embed_dim: int = 64
    mapping_layers: int = 2
    mapping_lr_mul: float = 0.1
    channel_base: int = 512  # channels at resolution r: min(channel_max, channel_base // r)
    channel_max: int = 64
    use_noise: bool = False
    dataset: str = ""
    classes: list[str] = field(default_factory=list)

    def check(self) -> "BuiltinConfig":
        layout(self.img_resolution)
        if self.img_channels not in (1, 3):
            raise FedLatentError(f"img_channels must be 1 or 3, got {self.img_channels}")
        for name in ("c_dim", "z_dim", "w_dim", "embed_dim", "mapping_layers", "channel_base", "channel_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "c_dim" else 1):
                raise FedLatentError(f"built-in generator option {name} must be a positive integer, got {v!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "BuiltinConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FedLatentError(f"unknown built-in generator option(s): {', '.join(unknown)}")
        return cls(**d).check()


def layout(resolution: int) -> tuple[int, int]:
    """(start size, number of 2x upsamplings) for an output resolution ``start * 2**n`` with start in 4..7 and
    n >= 1 (16 px: 4 -> 8 -> 16; 28 px: 7 -> 14 -> 28; 32 px: 4 -> 8 -> 16 -> 32; 64, 96, 128, ... alike)."""
    r = int(resolution)
    for start in (4, 5, 6, 7):
        n = 0
        while start << (n + 1) <= r:
            n += 1
            if start << n == r:
                return start, n
    raise FedLatentError(f"built-in generator makes images of start * 2**n pixels (start 4..7, n >= 1: 8, 10, 12, "
                         f"14, 16, 20, 24, 28, 32, 40, 48, 56, 64, ...), got {resolution}")


def _pow2_ceil(r: int) -> int:
    return 1 << max(0, (int(r) - 1).bit_length())


def _channels(cfg: BuiltinConfig, res: int) -> int:
    return int(max(1, min(cfg.channel_max, cfg.channel_base // _pow2_ceil(res))))


def _upsample2x_transpose(g: torch.Tensor, dim: int) -> torch.Tensor:
    """The adjoint of 2x bilinear upsampling (``align_corners=False``) along one axis ``dim``, written densely.

    Forward, along that axis: ``y[2i] = 3/4 x[i] + 1/4 x[i-1]`` and ``y[2i+1] = 3/4 x[i] + 1/4 x[i+1]``, indices
    clamped to the edge (``F.interpolate`` samples at ``i -+ 1/4``). So ``dx[j] = 3/4 (g[2j] + g[2j+1]) +
    1/4 (g[2j+2] + g[2j-1])``, where the clamped taps read ``g[2n] -> g[2n-1]`` and ``g[-1] -> g[0]``.
    """
    n = g.shape[dim] // 2
    shape = list(g.shape)
    shape[dim:dim + 1] = [n, 2]
    g = g.reshape(shape)
    even, odd = g.select(dim + 1, 0), g.select(dim + 1, 1)
    after = torch.cat([even.narrow(dim, 1, n - 1), odd.narrow(dim, n - 1, 1)], dim)  # g[2j+2], clamped
    before = torch.cat([even.narrow(dim, 0, 1), odd.narrow(dim, 0, n - 1)], dim)  # g[2j-1], clamped
    return 0.75 * (even + odd) + 0.25 * (after + before)


class _Upsample2x(torch.autograd.Function):
    """``F.interpolate`` 2x bilinear forward, :func:`_upsample2x_transpose` (both axes) backward."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _upsample2x_transpose(_upsample2x_transpose(grad, 3), 2)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling of [N, C, H, W] (``align_corners=False``, edges replicated), as in StyleGAN-style
    synthesis layers.

    Eager, this is ``F.interpolate`` with its native backward. Under ``torch.compile`` the backward is the dense
    transpose :func:`_upsample2x_transpose` instead: inductor lowers ``F.interpolate``'s backward to a scalar
    scatter-add, the slowest kernel of compiled rendering (benchmarks/RESULTS.md, "the upsampling's dense adjoint").
    """
    if torch.compiler.is_compiling():
        return _Upsample2x.apply(x)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2)) along dim 1 (StyleGAN's input normalisation of z and the class embedding)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualLinear(nn.Module):
    """Fully-connected layer with equalised learning rate (weight ~ N(0, 1/lr_mul^2), scaled at run time)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return ops.bias_act(x, None, alpha=0.2, gain=math.sqrt(2)) if self.activation else x  # lrelu * sqrt(2)


class MappingNetwork(nn.Module):
    """(z, one-hot c) -> ws [N, num_ws, w_dim]."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, embed_dim: int = 64, num_layers: int = 2,
                 lr_mul: float = 0.1, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = EqualLinear(c_dim, embed_dim) if c_dim > 0 else None
        dims = [z_dim + (embed_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        self.fcs = nn.ModuleList(EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("w_avg", torch.zeros(max(c_dim, 1), w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise FedLatentError(f"mapping expects one-hot labels [N, {self.c_dim}]")
            x = torch.cat([x, normalize_2nd_moment(self.embed(c.to(x.dtype)))], dim=1)
        for fc in self.fcs:
            x = fc(x)
        if truncation_psi != 1.0:
            center = c.to(x.dtype) @ self.w_avg if self.c_dim > 0 else self.w_avg[0].expand_as(x)
            x = center.lerp(x, truncation_psi)
        return x.unsqueeze(1).repeat(1, self.num_ws, 1)

    @torch.no_grad()
    def update_w_avg(self, ws: torch.Tensor, c: torch.Tensor | None) -> None:
        """Running (per-class) mean of w, the centre used by truncation."""
        w = ws[:, 0] if ws.ndim == 3 else ws
        if self.c_dim > 0:
            counts = c.sum(0)
            means = (c.t() @ w) / counts.clamp(min=1)[:, None]
            seen = counts > 0
            self.w_avg[seen] = means[seen].lerp(self.w_avg[seen], self.w_avg_beta)
        else:
            self.w_avg[0] = w.mean(0).lerp(self.w_avg[0], self.w_avg_beta)


class SynthesisInput(nn.Module):
    """Learned constant feature map, scaled channel-wise by an affine function of w0."""

    def __init__(self, w_dim: int, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        self.const = nn.Parameter(torch.randn(channels, size, size))
        self.affine = EqualLinear(w_dim, channels, bias_init=1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.const.unsqueeze(0) * self.affine(w)[:, :, None, None]


class StyleLayer(nn.Module):
    """Modulated convolution layer ``x, w -> x'`` (StyleGAN2 Eq. 1-3), optionally upsampling 2x first.

    Implemented as "modulate activations, shared convolution, demodulate outputs", which equals the grouped
    per-sample weight form exactly: conv(x * s, W) * d with d_o = rsqrt(sum_i s_i^2 sum_k W_oik^2 + eps).
    """

    def __init__(self, w_dim: int, in_channels: int, out_channels: int, resolution: int, kernel_size: int = 3,
                 up: bool = False, demodulate: bool = True, activate: bool = True, use_noise: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.kernel_size, self.up, self.demodulate, self.activate = kernel_size, up, demodulate, activate
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.use_noise = use_noise
        self.noise_mode = "const"  # 'random' while training, 'const' (fixed buffer) or 'none' otherwise
        if use_noise:
            self.noise_strength = nn.Parameter(torch.zeros([]))
            self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # [N, in]
        weight = self.weight * self.weight_gain
        if self.up:
            x = upsample2x(x)
        x = F.conv2d(x * styles[:, :, None, None], weight, padding=self.kernel_size // 2)
        if self.demodulate:
            d = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()  # [N, out]
            x = x * d[:, :, None, None]
        if self.use_noise and self.noise_mode != "none":
            if self.noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            else:
                noise = self.noise_const.to(x.dtype)
            x = x + noise * self.noise_strength
        if self.activate:  # leaky_relu(x + bias, 0.2) * sqrt(2), one fused kernel on CUDA
            return ops.bias_act(x, self.bias, dim=1, alpha=0.2, gain=math.sqrt(2))
        return x + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, res={self.resolution}, k={self.kernel_size}, "
                f"up={self.up}, demod={self.demodulate}")


class SynthesisNetwork(nn.Module):
    """``input`` + ``layer_names`` (StyleGAN-XL's layout): ws[:, 0] feeds the input, ws[:, 1 + i] layer i."""

    def __init__(self, cfg: BuiltinConfig):
        super().__init__()
        start, n_up = layout(cfg.img_resolution)
        self.w_dim, self.img_resolution, self.img_channels = cfg.w_dim, cfg.img_resolution, cfg.img_channels
        self.output_scale = 1
        res, ch = start, _channels(cfg, start)
        self.input = SynthesisInput(cfg.w_dim, ch, start)
        self.layer_names: list[str] = []

        def add(layer: StyleLayer) -> None:
            name = f"L{len(self.layer_names)}_{layer.resolution}_{layer.out_channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

        add(StyleLayer(cfg.w_dim, ch, ch, res, use_noise=cfg.use_noise))
        for _ in range(n_up):
            res *= 2
            out = _channels(cfg, res)
            add(StyleLayer(cfg.w_dim, ch, out, res, up=True, use_noise=cfg.use_noise))
            add(StyleLayer(cfg.w_dim, out, out, res, use_noise=cfg.use_noise))
            ch = out
        add(StyleLayer(cfg.w_dim, ch, cfg.img_channels, res, kernel_size=1, demodulate=False, activate=False))
        assert res == cfg.img_resolution
        self.num_ws = len(self.layer_names) + 1

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.input(ws[:, 0])
        for i, name in enumerate(self.layer_names):
            x = getattr(self, name)(x, ws[:, 1 + i])
        return x


class BuiltinStyleGenerator(nn.Module):
    """The built-in generator module (``G.mapping``, ``G.synthesis``); wrap with :func:`as_generator`."""

    def __init__(self, cfg: BuiltinConfig | None = None, **kwargs):
        super().__init__()
        cfg = (cfg or BuiltinConfig(**kwargs)).check()
        self.cfg = cfg
        self.z_dim, self.w_dim, self.c_dim = cfg.z_dim, cfg.w_dim, cfg.c_dim
        self.img_resolution, self.img_channels = cfg.img_resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.num_ws, cfg.embed_dim,
                                      cfg.mapping_layers, cfg.mapping_lr_mul)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0) -> torch.Tensor:
        return self.synthesis(self.mapping(z, c, truncation_psi=truncation_psi))

    def set_noise_mode(self, mode: str) -> None:
        for m in self.modules():
            if isinstance(m, StyleLayer):
                m.noise_mode = mode

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def as_generator(G: BuiltinStyleGenerator, name: str = "") -> LayeredGenerator:
    """The :class:`~fedlatent.generators.base.Generator` interface over a built-in module."""
    return LayeredGenerator(G, name=name or (G.cfg.dataset and f"builtin-{G.cfg.dataset}") or "builtin")


# --- checkpoints ---------------------------------------------------------------------------------------------
def save_builtin(G: BuiltinStyleGenerator, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write ``G`` (float32 weights + buffers) as safetensors; config and ``info`` go to the JSON metadata."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in G.state_dict().items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(asdict(G.cfg), sort_keys=True),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    save_safetensors(path, tensors, meta)


def read_builtin_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a built-in checkpoint: ``{"config": {...}, "info": {...}}`` (validated)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FedLatentError(f"generator checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise FedLatentError(f"{path}: not a readable safetensors file ({type(e).__name__}: {_one_line(e)})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FedLatentError(f"{path}: not a fedlatent built-in generator checkpoint (metadata format={meta.get('format')!r})")
    try:
        return {"config": json.loads(meta["config"]), "info": json.loads(meta.get("info", "{}"))}
    except (KeyError, ValueError) as e:
        raise FedLatentError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})") from None


def load_builtin(path: str | os.PathLike, device: str | torch.device = "cpu") -> BuiltinStyleGenerator:
    """Load a checkpoint written by :func:`save_builtin`; any damage gives a one-line FedLatentError."""
    from safetensors.torch import load_file

    meta = read_builtin_metadata(path)
    G = BuiltinStyleGenerator(BuiltinConfig.from_dict(meta["config"]))
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise FedLatentError(f"{path}: damaged safetensors data ({type(e).__name__}: {_one_line(e)})") from None
    missing, unexpected = G.state_dict().keys() - tensors.keys(), tensors.keys() - G.state_dict().keys()
    if missing or unexpected:
        raise FedLatentError(f"{path}: checkpoint does not match its config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
    try:
        G.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise FedLatentError(f"{path}: checkpoint does not match its config ({_one_line(e)})") from None
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FedLatentError(f"{path}: tensor {k} contains NaN/inf (damaged checkpoint)")
    return G.to(device).eval().requires_grad_(False)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


__all__ = [
    "BuiltinConfig", "BuiltinStyleGenerator", "MappingNetwork", "SynthesisNetwork", "SynthesisInput", "StyleLayer",
    "EqualLinear", "as_generator", "layout", "save_builtin", "load_builtin", "read_builtin_metadata", "normalize_2nd_moment",
]
