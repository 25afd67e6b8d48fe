"""``torch.compile`` with a safe fallback, shared by every compiled path (the MTT ConvNet kernel,
:mod:`fedlatent.distill.compiled`; the generator's rendering, :class:`fedlatent.generators.LatentSet`): whether
inductor can run here, the compiled functions (built once per process) and the dispatch that falls back to the
eager function -- same results up to float rounding -- when compilation fails at run time."""
from __future__ import annotations

import os
import shutil
import warnings

import torch

from .errors import FedLatentError

#: keyword arguments of the ``torch.compile`` calls (set before the first compiled call to change them)
COMPILE_OPTIONS: dict = {"dynamic": False}
#: inductor options of the compiled functions whose tensors are on the CPU (unless COMPILE_OPTIONS names a
#: ``mode``, which torch.compile does not combine with options): the C++ wrapper, so that each graph's kernels
#: are one C++ file and one compiler run instead of one per kernel -- less compile CPU time, same kernels
#: (benchmarks/RESULTS.md, "the pooling adjoint as a broadcast")
CPU_INDUCTOR_OPTIONS: dict = {"cpp_wrapper": True}
_COMPILED: dict = {}
#: ``failed``: a compilation failed in this process; later compiled calls run eagerly
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


def require(what: str, advice: str = "") -> None:
    """A one-line :class:`FedLatentError` when ``what`` (e.g. 'the compiled ConvNet kernel') cannot compile here."""
    reason = compile_unavailable()
    if reason is not None:
        raise FedLatentError(f"{what} needs torch.compile with a C++ compiler: {reason}{advice}")


def usable_on(device: torch.device | str) -> bool:
    """Whether the 'fast' engines compile on ``device``: a CPU with a C++ compiler and no failed compilation in
    this process (on CUDA compile is not measured, so 'fast' stays eager there)."""
    return torch.device(device).type == "cpu" and compile_unavailable() is None and not STATE["failed"]


def compiled(fn, name: str, device_type: str = "cpu"):
    """``torch.compile`` of ``fn`` for tensors on ``device_type``, built once per process under ``name``. Shapes
    are static (``dynamic=False``): every new shape, dtype, architecture or flag combination compiles once more
    (up to torch's recompile limit, beyond which torch runs the function uncompiled)."""
    key = (name, device_type)
    out = _COMPILED.get(key)
    if out is None:
        kw = dict(COMPILE_OPTIONS)
        if device_type == "cpu" and CPU_INDUCTOR_OPTIONS and "mode" not in kw:
            kw["options"] = dict(CPU_INDUCTOR_OPTIONS)
        out = _COMPILED[key] = torch.compile(fn, **kw)
    return out


def call(fn, name: str, args: tuple, what: str):
    """``fn(*args)`` compiled; on a compiler failure the eager result (bad input raises its own error there), a
    warning naming ``what``, and no further compilation in this process."""
    if STATE["failed"]:
        return fn(*args)
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    try:
        return compiled(fn, name, device_type)(*args)
    except Exception as e:  # noqa: BLE001 -- the compiler failed, or the input is bad: eager tells which
        out = fn(*args)
        STATE["failed"] = True
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"torch.compile of {what} failed ({type(e).__name__}: {msg[:200]}); running it uncompiled "
                      f"(same results, slower)", RuntimeWarning, stacklevel=4)
        return out


__all__ = ["COMPILE_OPTIONS", "CPU_INDUCTOR_OPTIONS", "STATE", "compile_unavailable", "require", "usable_on", "compiled",
           "call"]
