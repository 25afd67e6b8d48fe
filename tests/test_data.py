"""Dataset loading: digits, npz folders, bad files, search order, real data (if present), CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fedlatent.data import (
    DATASETS, denormalize, find_npz_folder, inspect_dataset, load_dataset, load_npz_folder, normalize, search_roots,
)
from fedlatent.utils import FedLatentError


@pytest.fixture(autouse=True)
def _isolated_search(monkeypatch, tmp_path_factory):
    """No test sees the caller's FEDLATENT_DATA or torchvision cache unless it sets them itself."""
    monkeypatch.delenv("FEDLATENT_DATA", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


def test_digits_shapes_and_normalisation(digits16):
    d = digits16
    assert d.x_train.shape == (1347, 1, 16, 16) and d.x_test.shape == (450, 1, 16, 16)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.channels == 1 and d.image_size == 16 and d.num_classes == 10
    assert set(d.y_train.tolist()) == set(range(10)) and set(d.y_test.tolist()) == set(range(10))
    x01 = d.denormalize(d.x_train)
    assert float(x01.min()) >= 0.0 and float(x01.max()) <= 1.0
    assert float(x01.min()) < 0.01 and float(x01.max()) > 0.99  # the full [0, 1] range is used
    # normalise(denormalise(x)) is the identity on in-range data
    assert torch.allclose(normalize(x01, d.mean, d.std), d.x_train, atol=1e-5)
    # the normalised pixels are (x - mean) / std of a [0, 1] image
    assert torch.allclose(d.x_train.min(), torch.tensor((0 - d.mean[0]) / d.std[0]), atol=1e-3)


def test_digits_default_size_and_case_insensitive_name():
    d = load_dataset("Digits")
    assert d.x_train.shape[1:] == (1, 32, 32)


def test_npz_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 6, 6, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1], dtype=np.int64)
    folder = tmp_path / "toy"
    folder.mkdir()
    np.savez_compressed(folder / "train.npz", x=x, y=y)
    np.savez_compressed(folder / "test.npz", x=x[:4], y=y[:4])
    (folder / "classes.json").write_text(json.dumps(["cat", "dog", "emu"]))
    d = load_npz_folder(folder)
    assert d.x_train.shape == (10, 3, 6, 6) and d.x_test.shape == (4, 3, 6, 6)
    assert d.classes == ["cat", "dog", "emu"] and d.y_train.tolist() == y.tolist()
    back = denormalize(d.x_train, d.mean, d.std).permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(back - x).max() < 1e-3  # NHWC uint8 -> normalised NCHW float -> back
    # mean/std estimated from the training pixels
    assert np.allclose(d.mean, (x / 255.0).reshape(-1, 3).mean(0), atol=1e-6)
    # the same folder through the registry syntax, resized
    d2 = load_dataset(f"npz:{folder}", resize=12)
    assert d2.x_train.shape == (10, 3, 12, 12)


def test_npz_without_classes_json(npz_folder):
    d = load_npz_folder(npz_folder(classes=3))
    assert d.classes == ["0", "1", "2"] and d.x_train.shape == (12, 1, 8, 8)


def _bad_folder(npz_folder, what: str):
    folder = npz_folder("bad")
    train = folder / "train.npz"
    rng = np.random.default_rng(0)
    if what == "missing":
        (folder / "test.npz").unlink()
    elif what == "garbled":
        train.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif what == "truncated":
        train.write_bytes(train.read_bytes()[:200])
    elif what == "npy":
        with open(train, "wb") as f:
            np.save(f, np.zeros((2, 8, 8, 1), np.uint8))
    elif what == "dtype":
        np.savez(train, x=rng.random((12, 8, 8, 1)).astype(np.float32), y=np.zeros(12, np.int64))
    elif what == "shape":
        np.savez(train, x=np.zeros((12, 8, 8), np.uint8), y=np.zeros(12, np.int64))
    elif what == "channels":
        np.savez(train, x=np.zeros((12, 8, 8, 4), np.uint8), y=np.zeros(12, np.int64))
    elif what == "keys":
        np.savez(train, images=np.zeros((12, 8, 8, 1), np.uint8), labels=np.zeros(12, np.int64))
    elif what == "labels":
        np.savez(train, x=np.zeros((12, 8, 8, 1), np.uint8), y=np.zeros(11, np.int64))
    elif what == "negative":
        np.savez(train, x=np.zeros((12, 8, 8, 1), np.uint8), y=-np.ones(12, np.int64))
    elif what == "sizes":
        np.savez(train, x=np.zeros((12, 9, 9, 1), np.uint8), y=np.zeros(12, np.int64))
    elif what == "classes":
        (folder / "classes.json").write_text('{"a": 0}')
    elif what == "pickle":
        np.savez(train, x=np.array([object()] * 12, dtype=object), y=np.zeros(12, np.int64))
    return folder


@pytest.mark.parametrize("what,match", [
    ("missing", "missing test.npz"),
    ("garbled", "not a readable .npz"),
    ("truncated", "not a readable .npz"),
    ("npy", "single .npy array"),
    ("dtype", r"'x' must be uint8 .* got float32"),
    ("shape", r"'x' must be uint8 of shape \(N, H, W, C\)"),
    ("channels", "C in"),
    ("keys", r"expected arrays 'x' and 'y', found \['images', 'labels'\]"),
    ("labels", "'y' must be an integer vector of length 12"),
    ("negative", "negative labels"),
    ("sizes", "differ in shape"),
    ("classes", "JSON list"),
    ("pickle", "not a readable .npz"),
])
def test_bad_npz_files(npz_folder, what, match):
    folder = _bad_folder(npz_folder, what)
    with pytest.raises(FedLatentError, match=match) as e:
        load_npz_folder(folder)
    assert "\n" not in str(e.value)  # one line for the CLI


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(FedLatentError, match="unknown dataset 'imagenet-1k'.*digits"):
        load_dataset("imagenet-1k")
    with pytest.raises(FedLatentError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope'}")
    with pytest.raises(FedLatentError, match="not found.*FEDLATENT_DATA"):
        load_dataset("cifar100", root=tmp_path)  # nothing anywhere: says where it looked and what to do


def test_search_order_root_beats_env(tmp_path, monkeypatch, write_split):
    env_root, arg_root = tmp_path / "env", tmp_path / "arg"
    for r, n in ((env_root, 12), (arg_root, 9)):
        write_split(r / "mnist" / "train.npz", n=n, size=28, classes=10)
        write_split(r / "mnist" / "test.npz", n=5, size=28, classes=10)
    monkeypatch.setenv("FEDLATENT_DATA", str(env_root))
    assert search_roots(arg_root)[:2] == [arg_root, env_root]
    assert find_npz_folder("mnist", arg_root) == arg_root / "mnist"
    assert len(load_dataset("mnist", root=arg_root).y_train) == 9  # the argument wins
    assert len(load_dataset("mnist").y_train) == 12  # then the environment
    d = load_dataset("mnist")
    assert d.mean == DATASETS["mnist"].mean  # registry datasets keep the published constants


def test_inspect_dataset_reads_headers(tmp_path, write_split):
    write_split(tmp_path / "cifar10" / "train.npz", n=14, size=32, channels=3, classes=10)
    write_split(tmp_path / "cifar10" / "test.npz", n=4, size=32, channels=3, classes=10)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train.npz").write_bytes(b"not a zip file at all")
    info = inspect_dataset("cifar10", tmp_path)
    assert info["found"] and info["source"] == "npz folder" and info["error"] is None
    assert (info["shape"], info["train"], info["test"], info["num_classes"]) == ((3, 32, 32), 14, 4, 10)
    bad = inspect_dataset("mnist", tmp_path)
    assert bad["found"] and bad["error"]
    missing = inspect_dataset("fashion-mnist", tmp_path)
    assert not missing["found"] and "fashion-mnist/train.npz" in missing["hint"]
    digits = inspect_dataset("digits")
    assert digits["source"] == "bundled" and (digits["train"], digits["test"]) == (1347, 450)


def test_cli_datasets(tmp_path, write_split):
    from click.testing import CliRunner

    from fedlatent.cli import main

    write_split(tmp_path / "mnist" / "train.npz", n=7, size=28, classes=10)
    write_split(tmp_path / "mnist" / "test.npz", n=3, size=28, classes=10)
    res = CliRunner().invoke(main, ["datasets", "--data-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(line.startswith("digits") and "bundled" in line for line in lines)
    mnist = next(line for line in lines if line.startswith("mnist"))
    assert "npz folder" in mnist and "1x28x28" in mnist and mnist.split()[-2:] == ["7", "3"]
    assert any(line.startswith("cifar100") and "not found" in line for line in lines)
    assert "to get it:" in res.output and str(tmp_path) in res.output


def test_shared_mnist_loads(shared_data_root):
    d = load_dataset("mnist", root=shared_data_root)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10
    assert torch.bincount(d.y_train, minlength=10).min() > 5000
    # published MNIST statistics -> the training set normalises to mean 0, std 1
    assert abs(float(d.x_train.mean())) < 0.01 and abs(float(d.x_train.std()) - 1) < 0.01


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    import stat

    from fedlatent.utils import atomic_write, atomic_write_text

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def broken(p):
        open(p, "w").write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"  # the previous file survives a crash
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
