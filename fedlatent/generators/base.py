"""One interface for every class-conditional style generator fedlatent can distil through.

The interface mirrors StyleGAN-XL's layered synthesis (GLaD, Cazenavette et al., CVPR 2023, Sec. 3):

* ``mapping(z, c) -> ws`` of shape ``[N, num_ws, w_dim]`` (one w vector per synthesis stage);
* ``synthesis_input(ws[:, 0]) -> x``: the input stage (StyleGAN-XL: Fourier features);
* ``layers``: the ordered synthesis layers, each applied as ``x = layer(x, w)`` with ``ws[:, 1 + i]``
  feeding layer ``i``;
* ``postprocess(x)``: what the synthesis does after its last layer (StyleGAN-XL: ``x * output_scale``).

Image = ``postprocess(layer_{L-1}(... layer_0(synthesis_input(ws[:,0]), ws[:,1]) ..., ws[:,L]))`` with values in
:attr:`Generator.output_range` (StyleGAN convention: [-1, 1]).

The latent space F_k (:mod:`fedlatent.generators.latent`) is the feature map after the input stage and the
first ``k`` layers, so :meth:`Generator.to_f` and :meth:`Generator.from_f` split the synthesis at layer ``k``
and ``from_f(to_f(ws, k), ws[:, 1 + k:], k) == synthesis(ws)`` exactly.

:class:`LayeredGenerator` adapts any ``nn.Module`` with StyleGAN-XL's attribute structure (``G.mapping``,
``G.synthesis.input``, ``G.synthesis.layer_names``, ``getattr(G.synthesis, name)(x, w)``, ``G.z_dim`` ...),
reading ``num_ws`` and ``layer_names`` at run time. fedlatent's built-in generator
(:mod:`fedlatent.generators.builtin`) has the same structure, so both back ends share this adapter.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import FedLatentError

Layer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Generator(ABC):
    """Abstract class-conditional layered generator (see the module docstring for the contract)."""

    z_dim: int
    w_dim: int
    c_dim: int  # number of classes (0 = unconditional)
    num_ws: int
    img_channels: int
    img_resolution: int
    output_range: tuple[float, float] = (-1.0, 1.0)
    name: str = ""

    # --- the four primitives every back end provides -------------------------------------------
    @abstractmethod
    def mapping(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0) -> torch.Tensor:
        """``z [N, z_dim]`` and class labels ``c`` (int ``[N]`` or one-hot ``[N, c_dim]``) -> ``ws [N, num_ws, w_dim]``."""

    @abstractmethod
    def synthesis_input(self, w0: torch.Tensor) -> torch.Tensor:
        """Input stage: ``w0 [N, w_dim]`` -> first feature map."""

    @property
    @abstractmethod
    def layers(self) -> Sequence[Layer]:
        """The ordered synthesis layers; layer ``i`` is applied as ``layer(x, ws[:, 1 + i])``."""

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Applied after the last layer (identity unless the back end scales its output)."""
        return x

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The underlying ``nn.Module`` (for ``.to()``, ``.parameters()``, dtype/device queries)."""

    # --- derived operations ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.module.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def to(self, device=None, dtype=None) -> "Generator":
        self.module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "Generator":
        """Evaluation mode, no parameter gradients: the generator is a fixed prior during distillation."""
        self.module.eval().requires_grad_(False)
        return self

    def one_hot(self, c: torch.Tensor | None, n: int) -> torch.Tensor:
        """Class labels (int ``[N]``) or one-hot rows (``[N, c_dim]``) -> float one-hot ``[N, c_dim]``."""
        if self.c_dim == 0:
            return torch.zeros(n, 0, device=self.device, dtype=self.dtype)
        if c is None:
            raise FedLatentError(f"generator {self.name or ''} is class-conditional ({self.c_dim} classes): pass labels")
        c = torch.as_tensor(c, device=self.device)
        if c.ndim == 1 and not c.is_floating_point():
            if len(c) and (int(c.min()) < 0 or int(c.max()) >= self.c_dim):
                raise FedLatentError(f"class label out of range 0..{self.c_dim - 1}: {c.min().item()}..{c.max().item()}")
            return F.one_hot(c.long(), self.c_dim).to(self.dtype)
        if c.ndim == 2 and c.shape[1] == self.c_dim:
            return c.to(self.dtype)
        raise FedLatentError(f"class labels must be int [N] or one-hot [N, {self.c_dim}], got {tuple(c.shape)}")

    def check_k(self, k: int) -> int:
        """Validate a latent-space index: -1 (W+) or 0..num_layers (F_k)."""
        if not isinstance(k, int) or isinstance(k, bool) or not (-1 <= k <= self.num_layers):
            raise FedLatentError(
                f"unknown latent space F{k}: this generator has {self.num_layers} synthesis layers, "
                f"so k must be in 0..{self.num_layers} (or -1 for W+)"
            )
        return k

    def _check_ws(self, ws: torch.Tensor, first: int = 0) -> None:
        want = self.num_ws - first
        if ws.ndim != 3 or ws.shape[1] != want or ws.shape[2] != self.w_dim:
            raise FedLatentError(f"expected ws of shape [N, {want}, {self.w_dim}], got {tuple(ws.shape)}")

    def to_f(self, ws: torch.Tensor, k: int) -> torch.Tensor:
        """Feature map F_k: the input stage then the first ``k`` layers (GLaD's ``to_f``)."""
        self.check_k(k)
        if k < 0:
            raise FedLatentError("W+ (k = -1) has no feature map f_k")
        self._check_ws(ws)
        x = self.synthesis_input(ws[:, 0])
        for i, layer in enumerate(self.layers[:k]):
            x = layer(x, ws[:, 1 + i])
        return x

    def from_f(self, f: torch.Tensor, ws_tail: torch.Tensor, k: int) -> torch.Tensor:
        """Image from ``f_k`` and the w vectors of the remaining layers (``ws_tail = ws[:, 1 + k:]``)."""
        self.check_k(k)
        self._check_ws(ws_tail, first=1 + k)
        x = f
        for i, layer in enumerate(self.layers[k:]):
            x = layer(x, ws_tail[:, i])
        x = self.postprocess(x)
        return x.float() if x.dtype == torch.float16 else x

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        """Full synthesis ``ws -> image`` (W+ space)."""
        self._check_ws(ws)
        return self.from_f(self.to_f(ws, 0), ws[:, 1:], 0)

    def generate(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0) -> torch.Tensor:
        """Direct generation ``(z, c) -> image`` in :attr:`output_range`."""
        return self.synthesis(self.mapping(z, c, truncation_psi=truncation_psi))

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None,
               truncation_psi: float = 1.0) -> torch.Tensor:
        """Images for the given labels from fresh ``z ~ N(0, I)`` (seeded by ``generator``)."""
        z = torch.randn(len(labels), self.z_dim, generator=generator, dtype=self.dtype).to(self.device)
        return self.generate(z, labels, truncation_psi=truncation_psi)

    def to_unit(self, img: torch.Tensor) -> torch.Tensor:
        """Generator output range -> [0, 1] (affine, not clamped, so gradients pass everywhere)."""
        lo, hi = self.output_range
        return (img - lo) / (hi - lo)

    def describe(self) -> dict:
        return {
            "name": self.name, "z_dim": self.z_dim, "w_dim": self.w_dim, "c_dim": self.c_dim, "num_ws": self.num_ws,
            "num_layers": self.num_layers, "img_channels": self.img_channels, "img_resolution": self.img_resolution,
            "output_range": list(self.output_range),
        }


class LayeredGenerator(Generator):
    """Adapter for a module with StyleGAN-XL's structure (``mapping``, ``synthesis.input``, ``synthesis.layer_names``).

    ``layer_kwargs`` are passed to every layer call (e.g. ``{"force_fp32": True}`` for StyleGAN-XL on CUDA).
    Everything (``num_ws``, ``layer_names``, ``output_scale``) is read from the module at call time.
    """

    def __init__(self, G: nn.Module, name: str = "", layer_kwargs: dict | None = None,
                 output_range: tuple[float, float] = (-1.0, 1.0)):
        for attr in ("mapping", "synthesis"):
            if not hasattr(G, attr):
                raise FedLatentError(f"generator {name or type(G).__name__} has no '{attr}' (not a StyleGAN-like network)")
        syn = G.synthesis
        for attr in ("input", "layer_names"):
            if not hasattr(syn, attr):
                raise FedLatentError(f"generator {name or type(G).__name__} has no 'synthesis.{attr}'")
        self.G = G
        self.name = name
        self.layer_kwargs = dict(layer_kwargs or {})
        self.output_range = tuple(output_range)

    # dimensions are read from the wrapped module each time
    @property
    def z_dim(self) -> int:  # type: ignore[override]
        return int(self.G.z_dim)

    @property
    def w_dim(self) -> int:  # type: ignore[override]
        return int(self.G.w_dim)

    @property
    def c_dim(self) -> int:  # type: ignore[override]
        return int(self.G.c_dim)

    @property
    def num_ws(self) -> int:  # type: ignore[override]
        return int(getattr(self.G, "num_ws", None) or self.G.synthesis.num_ws)

    @property
    def img_channels(self) -> int:  # type: ignore[override]
        return int(self.G.img_channels)

    @property
    def img_resolution(self) -> int:  # type: ignore[override]
        return int(self.G.img_resolution)

    @property
    def module(self) -> nn.Module:
        return self.G

    def mapping(self, z, c, truncation_psi: float = 1.0):
        z = torch.as_tensor(z, device=self.device)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise FedLatentError(f"expected z of shape [N, {self.z_dim}], got {tuple(z.shape)}")
        onehot = self.one_hot(c, len(z))
        if truncation_psi != 1.0:
            return self.G.mapping(z, onehot, truncation_psi=truncation_psi)
        return self.G.mapping(z, onehot)

    def synthesis_input(self, w0):
        return self.G.synthesis.input(w0)

    @property
    def layers(self) -> list[Layer]:
        syn, kw = self.G.synthesis, self.layer_kwargs
        if kw:
            return [(lambda m: (lambda x, w: m(x, w, **kw)))(getattr(syn, n)) for n in syn.layer_names]
        return [getattr(syn, n) for n in syn.layer_names]

    @property
    def layer_names(self) -> list[str]:
        return list(self.G.synthesis.layer_names)

    def postprocess(self, x):
        scale = getattr(self.G.synthesis, "output_scale", 1)
        return x * scale if scale != 1 else x


__all__ = ["Generator", "LayeredGenerator", "Layer"]
