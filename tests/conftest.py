"""Shared pytest fixtures (keep this file small)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits16():
    """scikit-learn digits at 16 px: the offline data set that always exists (1347 train / 450 test)."""
    from fedlatent.data import load_dataset

    return load_dataset("digits", resize=16)


def write_npz_split(path: Path, n: int = 12, size: int = 8, channels: int = 1, classes: int = 3, seed: int = 0) -> None:
    """Write a tiny valid split (x uint8 NHWC, y int64) to ``path``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x, y=y)


@pytest.fixture
def write_split():
    """The :func:`write_npz_split` helper, as a fixture (no import of conftest needed)."""
    return write_npz_split


@pytest.fixture
def npz_folder(tmp_path):
    """Factory: ``npz_folder(name="toy", **kw)`` writes ``tmp/name/{train,test}.npz`` and returns the folder."""

    def make(name: str = "toy", n_train: int = 12, n_test: int = 6, **kw) -> Path:
        folder = tmp_path / name
        write_npz_split(folder / "train.npz", n=n_train, seed=1, **kw)
        write_npz_split(folder / "test.npz", n=n_test, seed=2, **kw)
        return folder

    return make


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The project's offline real data (``$FEDLATENT_DATA`` or ``../shared/data``); skips if absent."""
    candidates = [Path(p) for p in os.environ.get("FEDLATENT_DATA", "").split(os.pathsep) if p]
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "mnist" / "train.npz").is_file():
            return c
    pytest.skip("offline data folder with mnist/train.npz not found ($FEDLATENT_DATA or ../shared/data)")


@pytest.fixture
def broken_compiler(monkeypatch):
    """A C++ compiler that is found but fails at run time: every ``fedlatent.compiling`` compiled call raises (the
    dispatch then falls back to eager and warns); ``compiling.STATE`` is reset, and restored afterwards."""
    from fedlatent import compiling

    def broken(fn, name, device_type="cpu"):
        def run(*a):
            raise RuntimeError("backend compiler failed (test)")
        return run

    monkeypatch.setattr(compiling, "compile_unavailable", lambda: None)
    monkeypatch.setitem(compiling.STATE, "failed", False)
    monkeypatch.setattr(compiling, "compiled", broken)
    return compiling
