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
``.pkl`` path (the user names the file, so the user trusts it).
"""
from __future__ import annotations

import json
import os
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


__all__ = ["load_generator", "fetch", "read_manifest", "write_manifest_entry", "get_entry", "entry_path",
           "pretrained_dir", "cache_dir", "MANIFEST_NAME"]
