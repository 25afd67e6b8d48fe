"""Build and load fedlatent's CUDA extension at first use (``torch.utils.cpp_extension.load`` + ninja).

* Sources: ``fedlatent/ops/csrc/fedlatent_ops.cpp`` (bindings, host compiler) and
  ``fedlatent_ops_kernels.cu`` (kernels, nvcc, no PyTorch headers so it compiles quickly).
* Cache: ``$FEDLATENT_CACHE/ops/<key>`` or ``~/.cache/fedlatent/ops/<key>`` with
  ``key = torch<version>-cu<cuda>-py<X.Y>-sm<archs>``; ninja rebuilds only when a source or flag changes, and
  PyTorch's file lock in that folder keeps concurrent first uses from building twice.
* Architectures: ``$TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' compute capabilities, else
  ``8.0;9.0`` (no GPU visible: a build that only proves the sources compile). ``MAX_JOBS`` limits ninja's
  parallel jobs as usual.
* Failure: :func:`load_extension` with ``strict=False`` warns ONCE per process and returns None (the ops fall
  back to the PyTorch reference); with ``strict=True`` it raises :class:`~fedlatent.utils.FedLatentError`
  with a one-line message.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..utils import FedLatentError

log = logging.getLogger("fedlatent.ops")

NAME = "fedlatent_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("fedlatent_ops.cpp", "fedlatent_ops_kernels.cu")
DEFAULT_ARCHS = "8.0;9.0"
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)(a)?(\+PTX)?$")


@dataclass
class BuildState:
    """What happened to the extension in this process."""

    tried: bool = False
    module: object | None = None
    error: str | None = None
    build_dir: str | None = None
    archs: str | None = None
    seconds: float | None = None
    warned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


STATE = BuildState()


def arch_list() -> str:
    """The CUDA architectures to build for (see the module docstring), e.g. ``"8.0;9.0"``."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # a broken driver must not stop the fallback
        pass
    return DEFAULT_ARCHS


def gencode_flags(archs: str) -> list[str]:
    """nvcc ``-gencode`` flags for an arch list like ``"8.0;9.0+PTX"`` (also accepts spaces and commas)."""
    flags = []
    for a in re.split(r"[;, ]+", archs.strip()):
        if not a:
            continue
        m = _ARCH_RE.match(a)
        if not m:
            raise FedLatentError(f"bad CUDA architecture {a!r} in TORCH_CUDA_ARCH_LIST={archs!r} (use e.g. 8.0;9.0+PTX)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3) or ''}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise FedLatentError(f"empty CUDA architecture list {archs!r}")
    return flags


def cache_root() -> Path:
    base = os.environ.get("FEDLATENT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedlatent")
    return Path(base) / "ops"


def build_dir(archs: str | None = None) -> Path:
    archs = archs or arch_list()
    sm = "_".join(re.sub(r"[^0-9a-zA-Z]+", "", a) for a in re.split(r"[;, ]+", archs) if a)
    key = f"torch{torch.__version__}-cu{torch.version.cuda or 'none'}-py{sys.version_info[0]}{sys.version_info[1]}-sm{sm}"
    return cache_root() / re.sub(r"[^0-9A-Za-z._-]+", "_", key)


def find_cuda_home() -> str | None:
    """A CUDA toolkit folder that really holds ``bin/nvcc`` and ``include/cuda_runtime.h``.

    PyTorch guesses ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on PATH is a wrapper
    script (e.g. ``/usr/local/bin/nvcc`` -> ``/usr/local``); then this looks at the usual install places.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [os.path.dirname(os.path.dirname(nvcc)), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    cands += ["/usr/local/cuda"] + sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # ninja/compiler output is long: keep the first error line if there is one
    m = re.search(r"(error[^:]*:[^\n]{0,200})", str(e))
    if m and len(text) > 300:
        text = " ".join(m.group(1).split())
    return f"{type(e).__name__}: {text[:300]}"


def _compile(archs: str, directory: Path, verbose: bool = False):
    """Run cpp_extension.load (may raise anything)."""
    if torch.version.cuda is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) was built without CUDA")
    home = find_cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc and include/cuda_runtime.h; set CUDA_HOME)")
    import torch.utils.cpp_extension as ce

    if ce.CUDA_HOME != home:  # PyTorch's guess lacks the headers/libraries (see find_cuda_home)
        ce.CUDA_HOME = home
    if shutil.which("ninja") is None:  # the pip ninja package installs its binary next to the interpreter
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    directory.mkdir(parents=True, exist_ok=True)
    return ce.load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", *gencode_flags(archs)],
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        verbose=verbose,
    )


def load_extension(strict: bool = False, verbose: bool = False):
    """The compiled extension module (building it on first use), or None if that failed and not ``strict``.

    The outcome is remembered for the process: a failed build is not retried, and warns only once.
    """
    st = STATE
    if st.module is not None:  # fast path: every op call on CUDA tensors comes through here
        return st.module
    with st.lock:
        if not st.tried:
            st.tried = True
            try:
                st.archs = arch_list()
                d = build_dir(st.archs)
                st.build_dir = str(d)
                log.info("fedlatent ops: building the CUDA extension in %s (first use; cached afterwards)", d)
                t0 = time.perf_counter()
                st.module = _compile(st.archs, d, verbose=verbose)
                st.seconds = time.perf_counter() - t0
            except Exception as e:  # compiler, ninja, linker, import errors: all mean "fall back"
                st.module, st.error = None, _one_line(e)
        if st.module is not None:
            return st.module
        if strict:
            raise FedLatentError(f"FEDLATENT_OPS=cuda but the fedlatent CUDA ops could not be built: {st.error}")
        if not st.warned:
            st.warned = True
            warnings.warn(f"fedlatent CUDA ops unavailable ({st.error}); falling back to the PyTorch reference ops "
                          "(set FEDLATENT_OPS=ref to silence this)", RuntimeWarning, stacklevel=3)
        return None


def reset() -> None:
    """Forget the outcome of the last build attempt (tests; a new attempt builds or loads again)."""
    global STATE
    STATE = BuildState()


def built(archs: str | None = None) -> bool:
    """Whether a compiled library exists in the cache for these archs (without loading it)."""
    d = build_dir(archs)
    return d.is_dir() and (any(d.glob(f"{NAME}*.so")) or any(d.glob(f"{NAME}*.pyd")))
