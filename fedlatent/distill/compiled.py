"""``torch.compile`` for the hand-written ConvNet kernel (:class:`fedlatent.distill.kernels.ConvNetKernel` with
``compile=True``, engines ``convnet-compiled`` / ``convnet-bf16-compiled``) and what ``engine="fast"`` picks
(measured in benchmarks/mtt_compile.py). The compile machinery itself (availability, the once-per-process
compiled functions, the eager fallback) is :mod:`fedlatent.compiling`."""
from __future__ import annotations

import torch

from .. import compiling

__all__ = ["fast_engine", "native_bf16", "run"]


def fast_engine(device: torch.device | str) -> str:
    """What ``engine="fast"`` runs on ``device``: the fastest exact ConvNet engine measured there
    (benchmarks/RESULTS.md, "The cell's engine"). On a CPU with AVX-512-BF16 and a C++ compiler
    'convnet-bf16-compiled' (bf16 convolution operands, within the stated gradient tolerance of fp32); with a
    compiler but no bf16 'convnet-compiled'; otherwise, and on CUDA (compile unmeasured there), 'convnet'."""
    if not compiling.usable_on(device):
        return "convnet"
    return "convnet-bf16-compiled" if native_bf16("cpu") else "convnet-compiled"


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware: CUDA, or a CPU with AVX-512-BF16 (elsewhere the
    ConvNet kernel emulates its bf16 convolutions, :mod:`fedlatent.distill.kernels`)."""
    if torch.device(device).type == "cuda":
        return True
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def run(kernel, fn, name: str, args: tuple):
    """``fn(kernel, *args)`` compiled (``ConvNetKernel._forward`` / ``._rop``), the eager result and a warning when
    compilation fails (:func:`fedlatent.compiling.call`)."""
    return compiling.call(fn, name, (kernel, *args), "the ConvNet kernel")
