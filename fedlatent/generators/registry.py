"""Pretrained generators: the manifest (``pretrained/MANIFEST.json``), downloads, and :func:`load_generator`.

Manifest entries (``models`` mapping name -> entry):

* ``kind: "builtin"``: a fedlatent built-in generator checkpoint committed next to the manifest (``file`` is
  relative to the manifest's folder), with the exact command that produced it and its sha256.
* ``kind: "stylegan-xl"``: an official StyleGAN-XL network pickle: ``url`` (from the StyleGAN-XL README),
  ``sha256`` (null when unknown). ``fedlatent pretrained fetch NAME`` downloads it into the cache folder
  (``$FEDLATENT_CACHE`` or ``~/.cache/fedlatent``) ``/pretrained/<file name>`` and records the digest of what it
  downloaded in ``<file>.sha256``. Loading by name verifies the file against the manifest digest, or else
  against the digest recorded at download time, before anything is unpickled.

:func:`load_generator` takes a manifest name, a ``.safetensors`` path (built-in) or an explicit StyleGAN-XL
``.pkl`` path (the user names the file, so the user trusts it), or a randomly initialised built-in generator
``random:res=32,channels=3,classes=10[,width=64,base=1024,z_dim=64,w_dim=128,seed=0]`` (an untrained prior; GLaD,
Cazenavette et al. 2023, report that even an untrained generator regularises distillation). ``fedlatent distill``
fills ``res``, ``channels`` and ``classes`` in from the data set (:func:`complete_generator_spec`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..utils import FedLatentError, atomic_write_text, sha256_file
from .base import Generator

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "fedlatent-pretrained-manifest"


def pretrained_dir() -> Path:
    """``$FEDLATENT_PRETRAINED`` or the repository's ``pretrained/`` folder."""
    env = os.environ.get("FEDLATENT_PRETRAINED")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "pretrained"


def cache_dir() -> Path:
    base = os.environ.get("FEDLATENT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedlatent")
    return Path(base) / "pretrained"


def empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "version": 1, "models": {}}


def read_manifest(path: str | os.PathLike | None = None) -> dict:
    path = Path(path) if path is not None else pretrained_dir() / MANIFEST_NAME
    if not path.is_file():
        return empty_manifest()
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FedLatentError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("models"), dict):
        raise FedLatentError(f"{path}: not a fedlatent pretrained manifest (no 'models' mapping)")
    return m


def write_manifest_entry(name: str, entry: dict, path: str | os.PathLike | None = None) -> Path:
    """Add or replace one entry (atomic rewrite, keys sorted, one entry per model)."""
    path = Path(path) if path is not None else pretrained_dir() / MANIFEST_NAME
    m = read_manifest(path)
    m.setdefault("format", MANIFEST_FORMAT)
    m.setdefault("version", 1)
    m["models"][name] = entry
    m["models"] = dict(sorted(m["models"].items()))
    atomic_write_text(path, json.dumps(m, indent=2) + "\n")
    return path


def get_entry(name: str, manifest: dict | None = None) -> dict:
    m = manifest if manifest is not None else read_manifest()
    if name not in m["models"]:
        raise FedLatentError(f"unknown pretrained generator {name!r}; known: {', '.join(sorted(m['models'])) or 'none'}")
    return m["models"][name]


def entry_path(name: str, entry: dict, manifest_dir: Path | None = None) -> Path:
    """Where the entry's file lives: next to the manifest (builtin) or in the download cache (StyleGAN-XL)."""
    if entry.get("kind") == "builtin":
        return (manifest_dir or pretrained_dir()) / entry["file"]
    fname = entry.get("file") or (entry.get("url", "").rsplit("/", 1)[-1] or f"{name}.pkl")
    return cache_dir() / fname


def _recorded_sha(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        return side.read_text().split()[0].strip() or None
    return None


def fetch(name: str, dest: str | os.PathLike | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download a manifest entry's file (urllib, tqdm progress bar), verify sha256 when known, return its path."""
    from tqdm.auto import tqdm

    entry = get_entry(name)
    target = Path(dest) / entry_path(name, entry).name if dest is not None else entry_path(name, entry)
    if entry.get("kind") == "builtin":
        p = entry_path(name, entry)
        if not p.is_file():
            raise FedLatentError(f"built-in checkpoint {p} is missing from this checkout (it is committed with the repo)")
        return p
    url = entry.get("url")
    if not url:
        raise FedLatentError(f"pretrained entry {name!r} has no url")
    want = entry.get("sha256")
    if target.is_file() and (not want or sha256_file(target) == want):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {name}", disable=not progress) as bar:
                while True:
                    buf = r.read(1 << 20)
                    if not buf:
                        break
                    out.write(buf)
                    bar.update(len(buf))
        if total is not None and part.stat().st_size != total:
            raise FedLatentError(f"download of {name} incomplete: {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise FedLatentError(f"cannot download {name} from {url} ({type(e).__name__}: {reason}); are you offline? "
                             f"Download it elsewhere and pass the file path instead") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    got = sha256_file(part)
    if want and got != want:
        part.unlink(missing_ok=True)
        raise FedLatentError(f"sha256 mismatch for {name}: expected {want}, downloaded {got}")
    shutil.move(str(part), str(target))
    atomic_write_text(target.with_name(target.name + ".sha256"), f"{got}  {target.name}\n")
    return target


def load_generator(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                   **stylegan_kwargs) -> Generator:
    """A :class:`~fedlatent.generators.base.Generator` from a manifest name or a file path.

    * manifest name (``fedlatent pretrained list``): builtin checkpoints are verified against the manifest
      sha256; StyleGAN-XL pickles must have been fetched and must match the manifest (or download) digest;
    * ``*.safetensors``: a built-in checkpoint;
    * ``*.pkl``: an official StyleGAN-XL network pickle the caller names explicitly (and thereby trusts).
    """
    from .builtin import as_generator, load_builtin
    from .stylegan_xl import load_stylegan_xl

    device = device if device is not None else "cpu"
    s = str(name_or_path)
    if parse_random_spec(s) is not None:
        return random_generator(s, device=device)
    m = read_manifest()
    if s in m["models"]:
        entry = m["models"][s]
        p = entry_path(s, entry)
        if entry.get("kind") == "builtin":
            if not p.is_file():
                raise FedLatentError(f"built-in checkpoint {p} for {s!r} is missing")
            if entry.get("sha256") and sha256_file(p) != entry["sha256"]:
                raise FedLatentError(f"{p}: sha256 differs from the manifest entry {s!r} (modified or damaged file)")
            return as_generator(load_builtin(p, device=device), name=s)
        if entry.get("kind") == "stylegan-xl":
            if not p.is_file():
                raise FedLatentError(f"{s!r} is not downloaded yet: run `fedlatent pretrained fetch {s}` "
                                     f"(or pass the path of a downloaded .pkl)")
            want = entry.get("sha256") or _recorded_sha(p)
            if not want:
                raise FedLatentError(f"{p}: no known sha256 to verify it against; pass the file path explicitly to "
                                     "trust it")
            return load_stylegan_xl(p, expected_sha256=want, device=device, name=s, **stylegan_kwargs)
        raise FedLatentError(f"manifest entry {s!r} has unknown kind {entry.get('kind')!r}")
    p = Path(s).expanduser()
    if p.suffix == ".safetensors":
        return as_generator(load_builtin(p, device=device), name=p.stem)
    if p.suffix in (".pkl", ".pickle"):
        return load_stylegan_xl(p, device=device, **stylegan_kwargs)
    if p.exists():
        raise FedLatentError(f"{p}: unknown generator file type (expected .safetensors or a StyleGAN-XL .pkl)")
    raise FedLatentError(f"unknown generator {s!r}: not a manifest name ({', '.join(sorted(m['models'])) or 'none'}) "
                         "nor an existing .safetensors/.pkl file")


# --- a randomly initialised generator as a prior ------------------------------------------------------------
RANDOM_PREFIX = "random"
_RANDOM_KEYS = {"res": "img_resolution", "channels": "img_channels", "classes": "c_dim", "width": "channel_max",
                "base": "channel_base", "z_dim": "z_dim", "w_dim": "w_dim", "mapping_layers": "mapping_layers",
                "seed": None}
_RANDOM_DEFAULTS = {"width": 64, "base": 1024, "z_dim": 64, "w_dim": 128, "mapping_layers": 2, "seed": 0}


def parse_random_spec(spec: str | os.PathLike | None) -> dict[str, int] | None:
    """Options of a ``random[:key=value,...]`` generator spec (None when ``spec`` is not one)."""
    s = str(spec or "").strip()
    if s != RANDOM_PREFIX and not s.startswith(RANDOM_PREFIX + ":"):
        return None
    opts: dict[str, int] = {}
    for part in filter(None, s[len(RANDOM_PREFIX) + 1:].split(",")):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or k not in _RANDOM_KEYS or not re.fullmatch(r"-?\d+", v.strip()):
            raise FedLatentError(f"bad random generator option {part!r}; use integer options "
                                 f"{', '.join(_RANDOM_KEYS)} (e.g. random:width=64,seed=1)")
        opts[k] = int(v)
    return opts


def complete_generator_spec(name: str | None, channels: int, resolution: int, classes: int) -> str | None:
    """A ``random`` spec with the data set's image shape and class count filled in (canonical order); any other
    name unchanged. Explicit ``res``/``channels``/``classes`` options are kept (and then checked by the caller)."""
    opts = parse_random_spec(name)
    if opts is None:
        return name
    full = {"res": int(resolution), "channels": int(channels), "classes": int(classes), **_RANDOM_DEFAULTS, **opts}
    return RANDOM_PREFIX + ":" + ",".join(f"{k}={full[k]}" for k in _RANDOM_KEYS)


def random_generator(spec: str, device: str | torch.device = "cpu") -> Generator:
    """An untrained built-in style generator, weights drawn from a seeded stream (see the module docstring)."""
    from ..utils import derive_seed
    from .builtin import BuiltinConfig, BuiltinStyleGenerator, as_generator

    opts = parse_random_spec(spec)
    if opts is None:
        raise FedLatentError(f"not a random generator spec: {spec!r}")
    missing = [k for k in ("res", "channels", "classes") if k not in opts]
    if missing:
        raise FedLatentError(f"random generator {spec!r} needs {', '.join(k + '=' for k in missing)} (fedlatent "
                             "distill fills them in from the data set)")
    full = {**_RANDOM_DEFAULTS, **opts}
    cfg = BuiltinConfig(**{_RANDOM_KEYS[k]: v for k, v in full.items() if _RANDOM_KEYS[k]}, dataset="random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(full["seed"], "random-generator"))
        G = BuiltinStyleGenerator(cfg)
    return as_generator(G.to(device).eval().requires_grad_(False), name=complete_generator_spec(spec, full["channels"],
                                                                                                 full["res"],
                                                                                                 full["classes"]))


# --- checkpoints named by path, and what to do when there is none ---------------------------------------------
def checkpoint_entry(path: str | os.PathLike) -> dict | None:
    """A manifest-like entry (dataset, public split) read from a built-in checkpoint's own metadata, so a generator
    passed by path gets its public split excluded from the clients just like a manifest one; None otherwise."""
    from .builtin import read_builtin_metadata

    p = Path(path).expanduser()
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        info = read_builtin_metadata(p)["info"]
    except FedLatentError:
        return None
    if not info.get("public_split"):
        return None
    return {"kind": "builtin", "dataset": info.get("dataset"), "public_split": info["public_split"]}


def no_generator_message(dataset: str, data_root: str | os.PathLike | None = None) -> str:
    """The error for a data set without a generator: how to train one, and the two generator-free options."""
    name = dataset[4:].rstrip("/\\") if dataset.startswith("npz:") else dataset
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name or "data").strip("-") or "data"
    root = f" --data-root {shlex.quote(str(data_root))}" if data_root and not dataset.startswith("npz:") else ""
    out = f"{slug}-generator.safetensors"
    return (f"no generator for {Path(name).name or dataset!r}; train one on a public split of its training set with "
            f"`fedlatent pretrain --dataset {shlex.quote(dataset)}{root} --public-split 0.1 --steps 20000 --max-minutes 60 "
            f"--out {out}`, then pass --generator {out} (the clients never see that public split); or use "
            "--generator random (an untrained generator as a prior) or --space pixel")


__all__ = ["load_generator", "fetch", "read_manifest", "write_manifest_entry", "get_entry", "entry_path",
           "pretrained_dir", "cache_dir", "MANIFEST_NAME", "parse_random_spec", "complete_generator_spec",
           "random_generator", "checkpoint_entry", "no_generator_message"]
