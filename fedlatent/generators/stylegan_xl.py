"""Loading official StyleGAN-XL network pickles (Sauer et al., SIGGRAPH 2022) behind fedlatent's generator API.

StyleGAN-XL pickles are plain ``pickle`` files holding a dict (``G``, ``D``, ``G_ema``, ``training_set_kwargs``,
...). The generator classes are "persistent" (``torch_utils.persistence``): their module source is embedded in
the pickle and executed on load, which imports ``dnnlib`` / ``torch_utils`` / ``legacy`` from the StyleGAN-XL
code. That code is NVIDIA-licensed and lives only in the git submodule ``third_party/stylegan-xl``; this module
puts it on ``sys.path`` only while loading (:func:`stylegan_xl_code`) and removes what the load imported again.

Unpickling executes code, so it happens only here and only for a file the user named explicitly or one whose
sha256 matches a known value (manifest, or the digest recorded by ``fedlatent pretrained fetch``).

The discriminator ``D`` (projected GAN: ``pg_modules``, ``feature_networks``, ``timm``, ``dill``) is never
built: :class:`_GeneratorOnlyUnpickler` resolves its classes to inert placeholders, so neither timm nor dill is
needed. Only ``G_ema`` is returned, frozen and wrapped in :class:`~fedlatent.generators.base.LayeredGenerator`.

Custom ops: StyleGAN's ``bias_act`` / ``upfirdn2d`` / ``filtered_lrelu`` default to ``impl='cuda'`` and use their
compiled plugins only for CUDA tensors (``_init()`` compiles on first use); on CPU the same calls take the
pure-PyTorch reference path. ``custom_ops="auto"`` compiles the plugins at load time when the device is CUDA
and falls back to the reference path (by making the op module's ``_init`` report failure) if compilation is
impossible; ``False`` always uses the reference path; ``True`` makes a failed build an error.
``conv2d_gradfix.enabled`` stays ``False`` (its custom conv only speeds up weight gradients; the generator is
frozen), so plain ``torch.nn.functional.conv2d`` is used everywhere.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ..utils import FedLatentError, sha256_file
from .base import LayeredGenerator

SUBMODULE_HINT = "run git submodule update --init third_party/stylegan-xl"
ENV_CODE_DIR = "FEDLATENT_STYLEGAN_XL"

# Top-level packages only the discriminator / training code refers to: never imported while unpickling.
_SKIP_PACKAGES = frozenset({"pg_modules", "feature_networks", "timm", "dill", "clip", "training.diffaug"})
# Modules whose names a load may add to sys.modules besides the ones that live inside the code folder.
_PERSISTENT_PREFIX = "_imported_module_"
_OP_MODULES = ("torch_utils.ops.bias_act", "torch_utils.ops.upfirdn2d", "torch_utils.ops.filtered_lrelu")


def default_code_dir() -> Path:
    """``$FEDLATENT_STYLEGAN_XL`` or the repository's ``third_party/stylegan-xl`` submodule."""
    env = os.environ.get(ENV_CODE_DIR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "third_party" / "stylegan-xl"


def check_code_dir(code_dir: str | os.PathLike | None = None) -> Path:
    """The StyleGAN-XL code folder, or a one-line FedLatentError saying how to get it."""
    d = Path(code_dir) if code_dir is not None else default_code_dir()
    if not (d / "torch_utils" / "persistence.py").is_file() or not (d / "dnnlib").is_dir():
        raise FedLatentError(f"StyleGAN-XL code not found in {d} (the git submodule is not checked out); {SUBMODULE_HINT}")
    return d


@contextlib.contextmanager
def stylegan_xl_code(code_dir: str | os.PathLike | None = None, keep_modules: bool = False) -> Iterator[Path]:
    """Put the StyleGAN-XL code on ``sys.path`` for the duration of the block.

    On exit ``sys.path`` is restored and the modules the block imported from the code folder (``dnnlib``,
    ``torch_utils``, ``legacy``, ``training``, and the ``_imported_module_*`` modules persistence creates) are
    dropped from ``sys.modules`` again (objects built meanwhile keep working: they hold references to their
    modules). Modules that were already imported before the block are left alone.
    """
    d = check_code_dir(code_dir).resolve()
    saved_path = list(sys.path)
    before = set(sys.modules)
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path[:] = saved_path
        if not keep_modules:
            for name in set(sys.modules) - before:
                mod = sys.modules.get(name)
                f = getattr(mod, "__file__", None) or ""
                inside = bool(f) and Path(f).resolve().is_relative_to(d)
                if inside or name.startswith(_PERSISTENT_PREFIX):
                    sys.modules.pop(name, None)


class _Skipped:
    """Inert stand-in for a discriminator-only class or function: accepts any construction, keeps no state."""

    _skipped_from = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls if isinstance(cls, type) else type(cls))

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return type(self)()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self._skipped_from}>"


def _load_builtin_type(name: str):
    """Stand-in for ``dill._dill._load_type``: a built-in type by name (``set``, ``FunctionType``, ...)."""
    import builtins
    import types

    t = getattr(builtins, name, None) or getattr(types, name, None)
    return t if isinstance(t, type) else _skipped_class("dill._dill._load_type", name)


def _skipped_class(module: str, name: str) -> type:
    return type(f"Skipped_{name}", (_Skipped,), {"_skipped_from": f"{module}.{name}"})


def _is_skipped_module(module: str) -> bool:
    parts = module.split(".")
    return any(".".join(parts[:i]) in _SKIP_PACKAGES for i in range(1, len(parts) + 1))


class _GeneratorOnlyUnpickler(pickle.Unpickler):
    """Unpickler for StyleGAN network pickles that never imports discriminator code.

    Classes from the discriminator's packages resolve to :class:`_Skipped`; tensors stored as
    ``torch.storage._load_from_bytes`` are loaded onto the CPU (as StyleGAN's ``legacy`` loader does).
    """

    skipped: set

    def find_class(self, module: str, name: str):
        if module == "torch.storage" and name == "_load_from_bytes":
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)
        if module == "dill._dill" and name == "_load_type":
            return _load_builtin_type  # e.g. the class-embedding's 'set' attribute, pickled once by dill
        if _is_skipped_module(module):
            self.skipped.add(f"{module}.{name}")
            return _skipped_class(module, name)
        return super().find_class(module, name)


def _find_skipped(G: torch.nn.Module) -> str | None:
    for mname, m in G.named_modules():
        for k, v in vars(m).items():
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            for x in vals:
                if isinstance(x, _Skipped):
                    return f"{mname or 'G'}.{k} -> {x._skipped_from}"
    return None


def _configure_ops(device: torch.device, custom_ops: bool | str) -> None:
    """Choose compiled CUDA plugins or the reference path for StyleGAN's custom ops (see module docstring)."""
    if custom_ops not in (True, False, "auto"):
        raise FedLatentError(f"custom_ops must be True, False or 'auto', got {custom_ops!r}")
    cops = sys.modules.get("torch_utils.custom_ops")
    if cops is not None:
        cops.verbosity = "none"
    gradfix = sys.modules.get("torch_utils.ops.conv2d_gradfix")
    if gradfix is not None:
        gradfix.enabled = False
    for name in _OP_MODULES:
        mod = sys.modules.get(name)
        if mod is None or not hasattr(mod, "_init"):
            continue
        if custom_ops is False:
            mod._init = lambda: False
            continue
        if device.type != "cuda":
            continue  # the ops themselves take the reference path for CPU tensors
        try:
            ok = mod._init()
        except Exception as e:  # compiler missing, CUDA toolkit mismatch, ...
            if custom_ops is True:
                raise FedLatentError(f"could not build StyleGAN-XL CUDA op {name.rsplit('.', 1)[-1]} "
                                     f"({type(e).__name__}: {_one_line(e)})") from None
            warnings.warn(f"StyleGAN-XL CUDA op {name.rsplit('.', 1)[-1]} unavailable ({type(e).__name__}); "
                          "using the (slower) reference implementation", RuntimeWarning, stacklevel=3)
            mod._init = lambda: False
        else:
            if not ok and custom_ops is True:
                raise FedLatentError(f"StyleGAN-XL CUDA op {name.rsplit('.', 1)[-1]} is unavailable")


def load_stylegan_xl(path: str | os.PathLike, *, expected_sha256: str | None = None,
                     code_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                     custom_ops: bool | str = "auto", key: str = "G_ema", name: str = "",
                     layer_kwargs: dict | None = None) -> LayeredGenerator:
    """Load ``G_ema`` from an official StyleGAN-XL network pickle the caller trusts.

    Every failure is a one-line :class:`FedLatentError`: missing submodule, missing file, sha256 mismatch
    (when ``expected_sha256`` is given), truncated/corrupt pickle, no ``G_ema`` in it, or a generator that
    refers to discriminator-only code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FedLatentError(f"StyleGAN-XL network pickle {path} does not exist")
    if expected_sha256:
        got = sha256_file(path)
        if got.lower() != expected_sha256.lower():
            raise FedLatentError(f"sha256 mismatch for {path}: expected {expected_sha256}, got {got} "
                                 "(incomplete or different download: delete it and fetch again)")
    device = torch.device(device)
    with stylegan_xl_code(code_dir):
        unpickler = None
        try:
            with open(path, "rb") as fh:
                unpickler = _GeneratorOnlyUnpickler(fh)
                unpickler.skipped = set()
                data = unpickler.load()
        except ModuleNotFoundError as e:
            raise FedLatentError(f"loading {path} needs the Python package {e.name!r} (pip install {e.name}); "
                                 "the StyleGAN-XL generator code imports it") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, ImportError,
                IndexError, RuntimeError, OSError, AssertionError, SyntaxError, MemoryError) as e:
            raise FedLatentError(f"{path}: truncated or corrupt StyleGAN-XL network pickle "
                                 f"({type(e).__name__}: {_one_line(e)})") from None
        if not isinstance(data, dict) or key not in data:
            have = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise FedLatentError(f"{path}: not a StyleGAN-XL network pickle (no {key!r}; found {have})")
        G = data[key]
        del data
        if not isinstance(G, torch.nn.Module):
            raise FedLatentError(f"{path}: {key!r} is a {type(G).__name__}, not a torch module")
        bad = _find_skipped(G)
        if bad is not None:
            raise FedLatentError(f"{path}: the generator refers to discriminator-only code ({bad}); cannot load it "
                                 "without timm/dill")
        G = G.eval().requires_grad_(False).to(device)
        _configure_ops(device, custom_ops)
    try:
        gen = LayeredGenerator(G, name=name or path.stem, layer_kwargs=layer_kwargs)
        gen.num_ws, gen.z_dim, gen.c_dim  # noqa: B018 - attribute check
    except (FedLatentError, AttributeError) as e:
        raise FedLatentError(f"{path}: {key!r} is not a StyleGAN-like generator ({_one_line(e)})") from None
    return gen


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


__all__ = ["load_stylegan_xl", "stylegan_xl_code", "check_code_dir", "default_code_dir", "SUBMODULE_HINT"]
