"""The contract between the trajectory-matching engine and whatever parameterises a synthetic set.

The distiller only needs "something that renders images and receives d loss / d image":

* :meth:`SyntheticSet.render` returns the current images as a tensor *detached* from any graph
  (shape ``[n, C, H, W]``, in the model's normalised input space);
* :meth:`SyntheticSet.backward` receives ``d loss / d images`` (same shape) and accumulates the
  gradient into the set's own parameters (pixels, latents, ...);
* :meth:`SyntheticSet.parameters` lists the optimisable tensors (leaf tensors with ``.grad``).

Pixel space implements this trivially; generator latent spaces (``fedlatent.generators``)
re-render in chunks with grad and back-propagate into the latents.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SyntheticSet(Protocol):
    def render(self) -> torch.Tensor: ...

    def backward(self, grad_images: torch.Tensor) -> None: ...

    def parameters(self) -> list[torch.Tensor]: ...


class PixelSet:
    """Synthetic images optimised directly in pixel space (MTT, DynaFed)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.detach().clone().requires_grad_(True)

    def render(self) -> torch.Tensor:
        return self.images.detach()

    def backward(self, grad_images: torch.Tensor) -> None:
        if grad_images.shape != self.images.shape:
            raise ValueError(f"gradient shape {tuple(grad_images.shape)} != images {tuple(self.images.shape)}")
        if self.images.grad is None:
            self.images.grad = grad_images.detach().clone()
        else:
            self.images.grad += grad_images.detach()

    def parameters(self) -> list[torch.Tensor]:
        return [self.images]
