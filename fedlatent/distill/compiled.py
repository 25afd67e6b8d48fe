"""``torch.compile`` for the hand-written ConvNet kernel (:class:`fedlatent.distill.kernels.ConvNetKernel` with
``compile=True``, engines ``convnet-compiled`` / ``convnet-bf16-compiled``): whether inductor can run here, the
compiled functions (built once per process), and the dispatch that falls back to the uncompiled kernel - same
results - when compilation fails at run time (measured in benchmarks/mtt_compile.py)."""
from __future__ import annotations

import os
import shutil
import warnings

import torch

#: keyword arguments of the ``torch.compile`` calls (set before the first compiled call to change them)
COMPILE_OPTIONS: dict = {"dynamic": False}
_COMPILED: dict = {}
#: ``failed``: a compilation failed in this process; later kernels run uncompiled
STATE = {"failed": False}


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` (inductor) cannot run here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch import _dynamo
        from torch._inductor import cpp_builder

        if not _dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
        cxx = cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 -- private API: any failure means no compiler
        return f"no C++ compiler found ({type(e).__name__}: {str(e).strip()[:120]})"
    if shutil.which(cxx) is None and not os.path.exists(cxx):
        return f"C++ compiler {cxx!r} not found"
    return None


def fast_engine(device: torch.device | str) -> str:
    """What ``engine="fast"`` runs on ``device``: the fastest exact ConvNet engine measured there
    (benchmarks/RESULTS.md, "The cell's engine"). On a CPU with AVX-512-BF16 and a C++ compiler
    'convnet-bf16-compiled' (bf16 convolution operands, within the stated gradient tolerance of fp32); with a
    compiler but no bf16 'convnet-compiled'; otherwise, and on CUDA (compile unmeasured there), 'convnet'."""
    if torch.device(device).type != "cpu" or compile_unavailable() is not None or STATE["failed"]:
        return "convnet"
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "convnet-bf16-compiled" if bf16 else "convnet-compiled"


def _compiled(fn, name: str):
    """``torch.compile`` of the kernel function ``fn`` (``ConvNetKernel._forward`` / ``._rop``), built once per
    process. Shapes are static (``dynamic=False``): every new batch shape, dtype, architecture or flag combination
    compiles once more (up to torch's recompile limit, beyond which torch runs the function uncompiled)."""
    out = _COMPILED.get(name)
    if out is None:
        out = _COMPILED[name] = torch.compile(fn, **COMPILE_OPTIONS)
    return out


def run(kernel, fn, name: str, args: tuple):
    """``fn(kernel, *args)`` compiled; on a compiler failure the eager result (bad input raises its own error
    there), a warning, and no further compilation in this process."""
    if STATE["failed"]:
        return fn(kernel, *args)
    try:
        return _compiled(fn, name)(kernel, *args)
    except Exception as e:  # noqa: BLE001 -- the compiler failed, or the input is bad: eager tells which
        out = fn(kernel, *args)
        STATE["failed"] = True
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"torch.compile of the ConvNet kernel failed ({type(e).__name__}: {msg[:200]}); "
                      f"running it uncompiled (same results, slower)", RuntimeWarning, stacklevel=4)
        return out
