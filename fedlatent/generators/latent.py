"""Latent spaces of a generator as synthetic-set parameterisations (GLaD, Cazenavette et al., CVPR 2023).

A :class:`LatentSet` owns the optimisable tensors of one space and renders images for the distiller:

* ``F_k`` (``k = 0 .. num_layers``): the feature map ``f_k`` after the generator's input stage and its first
  ``k`` synthesis layers, plus the w vectors of the remaining layers ``ws[:, 1 + k:]``. The earlier w vectors
  ``ws[:, :1 + k]`` were only used to compute the initial ``f_k``; they are kept as a (non-optimised) buffer.
  Image = layers k.. applied to ``f_k`` (:meth:`fedlatent.generators.base.Generator.from_f`).
* ``W+`` (``k = -1``): only ``ws`` (all ``num_ws`` vectors) is optimised; image = ``synthesis(ws)``.
* ``pixel``: the images themselves (DynaFed / MTT pixel space); rendering is the identity.

Initialisation per class (``ipc`` images per class, labels ``[0]*ipc + [1]*ipc + ...``): ``z ~ N(0, I)`` and
``ws = mapping(z, c)`` ("random"), or the class-mean ``w`` over ``mean_w_samples`` draws of ``z`` ("mean_w",
GLaD's ``--avg_w``); ``f_k`` is computed from ``ws`` and then ``nan_to_num`` (+-5) and clipped to ``+-clip``
(GLaD: 10).

Rendering maps the generator's output range to [0, 1] and then to the distiller's normalised input space
``(x01 - mean) / std`` (GLaD: ``(im + 1) / 2`` then normalise); no clamping, so gradients pass everywhere.
Memory is bounded by ``chunk_size``: :meth:`LatentSet.render` runs chunks without autograd, and
:meth:`LatentSet.backward` re-renders each chunk with autograd from detached copies of its latents and
back-propagates that chunk's slice of ``d loss / d images`` (GLaD's ``gan_backward``); the accumulated gradient
equals that of a single pass over all images. A set that fits in one chunk is rendered once per iteration
instead: :meth:`LatentSet.render` keeps that chunk's autograd graph (one chunk's graph, the memory the re-render
would take) and :meth:`LatentSet.backward` back-propagates through it while the latents are unchanged -- the same
operations on the same values, so bitwise the same gradient, without the second generator pass. The generator
is a fixed prior: its parameters get no gradient. ``compile=True`` renders through ``torch.compile``
(:mod:`fedlatent.compiling`; within float32 rounding of the eager renderer, not bitwise).
"""
from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import compiling
from ..data import normalize
from ..utils import FedLatentError, torch_generator
from .base import Generator

PIXEL = "pixel"
WPLUS = -1

# GLaD defaults: SGD(momentum 0.5), lr on w ~1-10, lr on f_k (and pixels) ~1e3-1e4.
DEFAULT_LR_W = 1.0
DEFAULT_LR_F = 1000.0
DEFAULT_MOMENTUM = 0.5


def parse_space(space: str | int) -> int | str:
    """``"F5"``/``"f5"``/``5`` -> 5, ``"W+"``/``"wp"``/``-1`` -> -1, ``"pixel"``/``"p"`` -> ``"pixel"``."""
    if isinstance(space, bool):
        raise FedLatentError(f"unknown latent space {space!r}")
    if isinstance(space, int):
        if space < -1:
            raise FedLatentError(f"unknown latent space F{space}: k must be >= 0 (or -1 for W+)")
        return space
    s = str(space).strip().lower()
    if s in ("pixel", "pixels", "p"):
        return PIXEL
    if s in ("w+", "wp", "w", "-1"):
        return WPLUS
    m = re.fullmatch(r"f?(\d+)", s)
    if m:
        return int(m.group(1))
    raise FedLatentError(f"unknown latent space {space!r}; use F0, F1, ... (feature space after k layers), W+ or pixel")


def space_name(k: int | str) -> str:
    return "pixel" if k == PIXEL else "W+" if k == WPLUS else f"F{k}"


class LatentSet:
    """A synthetic set parameterised in one latent space of ``generator`` (SyntheticSet protocol).

    Build it with :meth:`initialize` (per-class initialisation) or directly from tensors. ``labels`` are the
    distiller's class indices; ``gen_classes[label]`` is the generator class used for that label (identity by
    default).
    """

    def __init__(self, generator: Generator | None, space: str | int, labels: torch.Tensor, *,
                 ws: torch.Tensor | None = None, f: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), chunk_size: int = 64,
                 image_size: int | None = None, gen_classes: Sequence[int] | None = None, compile: bool = False):
        self.k = parse_space(space)
        if compile and self.k != PIXEL:
            compiling.require("compiled rendering")
        self.compile = bool(compile) and self.k != PIXEL
        self._graph: tuple | None = None  # (inputs, images, latents' versions) of the last one-chunk render
        self.G = generator
        self.labels = torch.as_tensor(labels).long().detach().clone()
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != len(self.std):
            raise FedLatentError(f"mean {self.mean} and std {self.std} differ in length")
        if chunk_size < 1:
            raise FedLatentError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.image_size = image_size
        self.gen_classes = list(gen_classes) if gen_classes is not None else None
        n = len(self.labels)
        self.ws_head: torch.Tensor | None = None
        self.ws: torch.Tensor | None = None  # optimised: all ws (W+) or ws[:, 1 + k:] (F_k)
        self.f: torch.Tensor | None = None
        self.images: torch.Tensor | None = None
        self.z_init: torch.Tensor | None = None  # the z drawn by initialize(init="random"), for provenance
        if self.k == PIXEL:
            if images is None or images.ndim != 4 or len(images) != n:
                raise FedLatentError(f"pixel space needs images of shape [{n}, C, H, W]")
            self.images = images.detach().clone().requires_grad_(True)
            return
        if generator is None:
            raise FedLatentError(f"latent space {space_name(self.k)} needs a generator")
        generator.check_k(self.k)
        if len(self.mean) != generator.img_channels:
            raise FedLatentError(f"dataset has {len(self.mean)} channel(s) but the generator makes {generator.img_channels}")
        if ws is None or ws.ndim != 3 or len(ws) != n:
            raise FedLatentError(f"latent space {space_name(self.k)} needs ws of shape [{n}, num_ws, w_dim]")
        if self.k == WPLUS:
            generator._check_ws(ws)
            self.ws = ws.detach().clone().requires_grad_(True)
        else:
            if f is None or len(f) != n:
                raise FedLatentError(f"latent space {space_name(self.k)} needs f_k with {n} rows")
            if ws.shape[1] == generator.num_ws:  # full ws given: split off the fixed head
                self.ws_head = ws[:, : 1 + self.k].detach().clone()
                ws = ws[:, 1 + self.k:]
            generator._check_ws(ws, first=1 + self.k)
            self.ws = ws.detach().clone().requires_grad_(True)
            self.f = f.detach().clone().requires_grad_(True)

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def initialize(cls, generator: Generator | None, space: str | int, ipc: int, *, num_classes: int | None = None,
                   seed: int = 0, init: str = "random", mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                   clip: float | None = 10.0, mean_w_samples: int = 1000, chunk_size: int = 64,
                   image_size: int | None = None, gen_classes: Sequence[int] | None = None,
                   channels: int | None = None, truncation_psi: float = 1.0,
                   labels: torch.Tensor | None = None, compile: bool = False) -> "LatentSet":
        """Per-class initialisation (GLaD ``prepare_latents``): ``ipc`` images for each class, or one image per
        entry of ``labels`` (class indices) when given.

        ``init``: ``"random"`` (``ws = mapping(z, c)``, fresh ``z`` per image) or ``"mean_w"`` (class-mean ``w`` over
        ``mean_w_samples`` draws; every image of a class starts identical). Pixel space: ``"random"`` = N(0, 1)
        noise in the normalised input space (``channels`` and ``image_size`` required). One ``seed`` fixes
        everything; the generator's global RNG state is not touched.
        """
        k = parse_space(space)
        if ipc < 1:
            raise FedLatentError(f"ipc must be >= 1, got {ipc}")
        if num_classes is None:
            if gen_classes is not None:
                num_classes = len(gen_classes)
            elif generator is not None:
                num_classes = generator.c_dim
            else:
                raise FedLatentError("num_classes is required for pixel space")
        labels = torch.arange(num_classes).repeat_interleave(ipc) if labels is None else torch.as_tensor(labels)
        labels = labels.long().cpu()
        if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise FedLatentError(f"labels must be a non-empty list of class indices below {num_classes}")
        if k == PIXEL:
            if init != "random":
                raise FedLatentError(f"pixel space supports init='random' only (got {init!r}); pass images to LatentSet")
            c = channels or len(mean)
            size = image_size or (generator.img_resolution if generator is not None else None)
            if size is None:
                raise FedLatentError("pixel space needs image_size")
            g = torch_generator(seed, "latent-init", "pixel")
            images = torch.randn(len(labels), c, size, size, generator=g)
            return cls(generator, k, labels, images=images, mean=mean, std=std, chunk_size=chunk_size,
                       image_size=image_size, gen_classes=gen_classes)
        if generator is None:
            raise FedLatentError(f"latent space {space_name(k)} needs a generator")
        generator.check_k(k)
        if gen_classes is not None and len(gen_classes) != num_classes:
            raise FedLatentError(f"gen_classes lists {len(gen_classes)} classes but num_classes={num_classes}")
        if generator.c_dim and gen_classes is None and num_classes > generator.c_dim:
            raise FedLatentError(f"{num_classes} classes requested but the generator knows only {generator.c_dim}")
        gcls = torch.as_tensor(gen_classes if gen_classes is not None else range(num_classes)).long()
        glabels = gcls[labels] if generator.c_dim else None
        dev, dt = generator.device, generator.dtype
        g = torch_generator(seed, "latent-init", init)
        z_init = None
        with torch.no_grad():
            if init == "random":
                z = z_init = torch.randn(len(labels), generator.z_dim, generator=g, dtype=dt).to(dev)
                ws = torch.cat([generator.mapping(zc, None if lc is None else lc.to(dev), truncation_psi=truncation_psi)
                                for zc, lc in _chunks2(z, glabels, chunk_size)])
            elif init in ("mean_w", "mean-w", "avg_w"):
                if mean_w_samples < 1:
                    raise FedLatentError(f"mean_w_samples must be >= 1, got {mean_w_samples}")
                per_class = {}
                for cl in gcls.tolist():
                    z = torch.randn(mean_w_samples, generator.z_dim, generator=g, dtype=dt).to(dev)
                    lab = torch.full((mean_w_samples,), cl, dtype=torch.long, device=dev) if generator.c_dim else None
                    acc = sum(generator.mapping(zc, lc).sum(0) for zc, lc in _chunks2(z, lab, max(chunk_size, 256)))
                    per_class[cl] = acc / mean_w_samples
                ws = torch.stack([per_class[int(gcls[l])] for l in labels.tolist()])
            else:
                raise FedLatentError(f"unknown latent init {init!r}; use 'random' or 'mean_w'")
            f = None
            if k != WPLUS:
                f = torch.cat([generator.to_f(wc, k) for wc in torch.split(ws, chunk_size)])
                f = torch.nan_to_num(f, nan=0.0, posinf=5.0, neginf=-5.0)
                if clip is not None:
                    f = f.clamp(-clip, clip)
        ls = cls(generator, k, labels, ws=ws, f=f, mean=mean, std=std, chunk_size=chunk_size,
                 image_size=image_size, gen_classes=gen_classes, compile=compile)
        ls.z_init = z_init
        return ls

    # --- SyntheticSet protocol ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def space(self) -> str:
        return space_name(self.k)

    def parameters(self) -> list[torch.Tensor]:
        if self.k == PIXEL:
            return [self.images]
        return [self.ws] if self.k == WPLUS else [self.ws, self.f]

    def param_groups(self, lr_w: float = DEFAULT_LR_W, lr_f: float = DEFAULT_LR_F,
                     momentum: float = DEFAULT_MOMENTUM) -> list[dict]:
        """Optimiser parameter groups (GLaD ``get_optimizer_img``): w with ``lr_w``, f_k with ``lr_f``.

        In W+ the single group holds ws (``lr_w``; GLaD's W+ runs use their image learning rate there, so pass
        that as ``lr_w``); in pixel space the single group holds the images (``lr_f``, the "image" learning
        rate). Use as ``torch.optim.SGD(latents.param_groups(...), lr=lr_w)``.
        """
        if self.k == PIXEL:
            return [{"params": [self.images], "lr": lr_f, "momentum": momentum, "name": "pixels"}]
        groups = [{"params": [self.ws], "lr": lr_w, "momentum": momentum, "name": "w"}]
        if self.k != WPLUS:
            groups.append({"params": [self.f], "lr": lr_f, "momentum": momentum, "name": "f"})
        return groups

    def _slices(self) -> Iterator[slice]:
        n = len(self)
        for i in range(0, n, self.chunk_size):
            yield slice(i, min(n, i + self.chunk_size))

    def _render_chunk(self, ws: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        if self.compile:
            return compiling.call(LatentSet._render_eager, "LatentSet.render", (self, ws, f), "the generator's rendering")
        return self._render_eager(ws, f)

    def _render_eager(self, ws: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        G = self.G
        img = G.synthesis(ws) if self.k == WPLUS else G.from_f(f, ws, self.k)
        x01 = G.to_unit(img)
        if self.image_size is not None and self.image_size != x01.shape[-1]:
            x01 = F.interpolate(x01, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                                antialias=self.image_size < x01.shape[-1])
        return normalize(x01, self.mean, self.std)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.parameters())

    def render(self) -> torch.Tensor:
        """All images, detached, in the distiller's normalised input space (chunked, no autograd; a one-chunk set
        keeps its graph for :meth:`backward`, see the module docstring)."""
        self._graph = None
        if self.k == PIXEL:
            return self.images.detach()
        if len(self) <= self.chunk_size:
            inputs = [t.detach().requires_grad_(True) for t in self.parameters()]
            with torch.enable_grad():
                img = self._render_chunk(inputs[0], inputs[1] if len(inputs) > 1 else None)
            self._graph = (inputs, img, self._versions())
            return img.detach()
        with torch.no_grad():
            return torch.cat([self._render_chunk(self.ws[s], None if self.f is None else self.f[s])
                              for s in self._slices()])

    def backward(self, grad_images: torch.Tensor) -> None:
        """Accumulate ``d loss / d latents`` given ``d loss / d images`` (chunk by chunk re-rendering)."""
        n = len(self)
        if grad_images.ndim != 4 or len(grad_images) != n:
            raise FedLatentError(f"gradient must have shape [{n}, C, H, W], got {tuple(grad_images.shape)}")
        if self.k == PIXEL:
            if grad_images.shape != self.images.shape:
                raise FedLatentError(f"gradient shape {tuple(grad_images.shape)} != images {tuple(self.images.shape)}")
            _accumulate(self.images, slice(0, n), grad_images.detach().to(self.images))
            return
        graph, self._graph = self._graph, None
        if graph is not None and graph[2] == self._versions():  # rendered by render(), latents unchanged since
            inputs, img, _ = graph
            if img.shape != grad_images.shape:
                raise FedLatentError(f"gradient shape {tuple(grad_images.shape[1:])} != rendered images "
                                     f"{tuple(img.shape[1:])}")
            grads = torch.autograd.grad(img, inputs, grad_outputs=grad_images.detach().to(img), allow_unused=True)
            for p, g in zip(self.parameters(), grads):
                _accumulate(p, slice(0, n), g)
            return
        for s in self._slices():
            ws = self.ws[s].detach().requires_grad_(True)
            f = None if self.f is None else self.f[s].detach().requires_grad_(True)
            inputs = [ws] if f is None else [ws, f]
            with torch.enable_grad():
                img = self._render_chunk(ws, f)
                if img.shape != grad_images[s].shape:
                    raise FedLatentError(f"gradient shape {tuple(grad_images.shape[1:])} != rendered images "
                                         f"{tuple(img.shape[1:])}")
                # autograd.grad, not backward(): the generator's own parameters never receive gradients
                grads = torch.autograd.grad(img, inputs, grad_outputs=grad_images[s].detach().to(img),
                                            allow_unused=True)
            _accumulate(self.ws, s, grads[0])
            if f is not None:
                _accumulate(self.f, s, grads[1])

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # --- convenience ----------------------------------------------------------------------------------------
    def render_unit(self) -> torch.Tensor:
        """Images in [0, 1] (clamped) for saving/plotting."""
        from ..data import denormalize

        return denormalize(self.render(), self.mean, self.std)

    def state_dict(self) -> dict:
        """Tensors (detached CPU clones) and the space description; reload with :meth:`load_state_dict`."""
        sd: dict = {"space": self.space, "labels": self.labels.clone(), "mean": list(self.mean), "std": list(self.std)}
        if self.gen_classes is not None:
            sd["gen_classes"] = list(self.gen_classes)
        for name in ("images", "ws", "f", "ws_head"):
            t = getattr(self, name)
            if t is not None:
                sd[name] = t.detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if parse_space(sd.get("space", "")) != self.k:
            raise FedLatentError(f"state is for latent space {sd.get('space')!r}, this set is {self.space}")
        for name in ("images", "ws", "f"):
            cur = getattr(self, name)
            if cur is None:
                continue
            if name not in sd or tuple(sd[name].shape) != tuple(cur.shape):
                raise FedLatentError(f"state for {self.space}: '{name}' missing or of the wrong shape")
            with torch.no_grad():
                cur.copy_(sd[name].to(cur))
        if "ws_head" in sd:
            self.ws_head = sd["ws_head"].to(self.ws)
        self.labels = torch.as_tensor(sd["labels"]).long().clone()

    def full_ws(self) -> torch.Tensor | None:
        """``[N, num_ws, w_dim]``: the fixed head joined with the optimised tail (F_k), or ws itself (W+)."""
        if self.k == PIXEL:
            return None
        if self.k == WPLUS:
            return self.ws.detach()
        if self.ws_head is None:
            return None
        return torch.cat([self.ws_head.to(self.ws), self.ws.detach()], dim=1)


def _accumulate(param: torch.Tensor, s: slice, grad: torch.Tensor | None) -> None:
    if grad is None:
        grad = torch.zeros_like(param[s])
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad[s] += grad.to(param.grad)


def _chunks2(a: torch.Tensor, b: torch.Tensor | None, size: int):
    for i in range(0, len(a), size):
        yield a[i:i + size], None if b is None else b[i:i + size]


__all__ = ["LatentSet", "parse_space", "space_name", "PIXEL", "WPLUS", "DEFAULT_LR_W", "DEFAULT_LR_F",
           "DEFAULT_MOMENTUM"]
