"""The distilled-set format (fedlatent.export): round trip, metadata, corrupted and foreign files."""
from __future__ import annotations

import json

import pytest
import torch

from fedlatent.export import load_distilled, read_metadata, save_distilled
from fedlatent.utils import FedLatentError

MEAN, STD = (0.3084,), (0.3977,)
NAMES = [str(i) for i in range(10)]


def _set(n_per_class: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 10 * n_per_class
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.arange(10).repeat_interleave(n_per_class)
    return x, y


def _save(path, **kw):
    x, y = _set()
    args = dict(dataset="digits", class_names=NAMES, mean=MEAN, std=STD, generator="digits", generator_sha256="ab" * 32,
                latent_space="F2", ipc=2, seed=7, clients=torch.arange(20) % 4, rounds=torch.full((20,), 3),
                latents={"ws": torch.randn(20, 7, 128), "f_k": torch.randn(20, 64, 8, 8)}, extra={"note": "x"})
    args.update(kw)
    save_distilled(path, x, y, **args)
    return x, y


def test_round_trip_float_and_metadata(tmp_path):
    p = tmp_path / "d.safetensors"
    x, y = _save(p)
    ds, meta = load_distilled(p)
    assert torch.equal(ds.images, x) and torch.equal(ds.labels, y)
    assert len(ds) == 20 and ds.num_classes == 10
    img, lab = ds[3]
    assert torch.equal(img, x[3]) and int(lab) == int(y[3])
    assert torch.equal(ds.clients, torch.arange(20) % 4) and torch.equal(ds.rounds, torch.full((20,), 3))
    assert set(ds.latents) == {"ws", "f_k"} and ds.latents["f_k"].shape == (20, 64, 8, 8)
    assert meta["format"] == "fedlatent.distilled" and meta["format_version"] == "1"
    assert meta["class_names"] == NAMES and meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["generator"] == "digits" and meta["generator_sha256"] == "ab" * 32
    assert meta["latent_space"] == "F2" and meta["ipc"] == 2 and meta["seed"] == 7
    assert meta["label_kind"] == "hard" and meta["image_encoding"] == "float-normalized"
    assert meta["extra"] == {"note": "x"} and meta["fedlatent_version"]
    raw = read_metadata(p)  # the header is plain str -> str
    assert all(isinstance(v, str) for v in raw.values()) and json.loads(raw["class_names"]) == NAMES
    # the lazy package-level re-export is the same function
    import fedlatent

    assert fedlatent.load_distilled is load_distilled


def test_uint8_encoding_quantises_within_half_a_step(tmp_path):
    p = tmp_path / "u.safetensors"
    x, y = _set()
    x = x.clamp(-MEAN[0] / STD[0], (1 - MEAN[0]) / STD[0])  # representable range [0, 1]
    save_distilled(p, x, y, dataset="digits", class_names=NAMES, mean=MEAN, std=STD, uint8=True)
    from safetensors.torch import load_file

    assert load_file(str(p))["images"].dtype == torch.uint8
    ds, meta = load_distilled(p)
    assert meta["image_encoding"] == "uint8"
    assert (ds.images - x).abs().max() <= 0.5 / 255 / STD[0] + 1e-6


def test_soft_labels_and_unlabelled(tmp_path):
    x, _ = _set()
    soft = torch.randn(20, 10)
    save_distilled(tmp_path / "s.safetensors", x, soft, dataset="digits", class_names=NAMES, mean=MEAN, std=STD)
    ds, meta = load_distilled(tmp_path / "s.safetensors")
    assert meta["label_kind"] == "soft" and torch.equal(ds.labels, soft)
    assert torch.equal(ds.hard_labels, soft.argmax(1))
    save_distilled(tmp_path / "n.safetensors", x, None, dataset="digits", class_names=NAMES, mean=MEAN, std=STD)
    ds, meta = load_distilled(tmp_path / "n.safetensors")
    assert ds.labels is None and meta["label_kind"] == "none"


@pytest.mark.parametrize("kw, match", [
    ({"labels": torch.zeros(19, dtype=torch.long)}, "shape"),
    ({"labels": torch.full((20,), 10)}, "0..9"),
    ({"images": torch.randn(20, 16, 16)}, r"\[N, C, H, W\]"),
    ({"images": torch.full((20, 1, 16, 16), float("nan"))}, "NaN"),
    ({"mean": (0.1, 0.2)}, "mean/std"),
    ({"clients": torch.zeros(3, dtype=torch.long)}, "clients"),
])
def test_save_rejects_bad_inputs(tmp_path, kw, match):
    x, y = _set()
    args = dict(images=x, labels=y, dataset="digits", class_names=NAMES, mean=MEAN, std=STD)
    args.update(kw)
    with pytest.raises(FedLatentError, match=match):
        save_distilled(tmp_path / "bad.safetensors", args.pop("images"), args.pop("labels"), **args)
    assert not (tmp_path / "bad.safetensors").exists()


def test_truncated_random_and_foreign_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    _save(good)
    blob = good.read_bytes()
    cases = {
        "truncated": blob[: len(blob) // 2],
        "header_only": blob[:8],
        "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8).tolist()),
        "empty": b"",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(FedLatentError) as e:
            load_distilled(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value), name
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(FedLatentError, match="foreign"):
        load_distilled(foreign)
    with pytest.raises(FedLatentError, match="no such"):
        load_distilled(tmp_path / "missing.safetensors")


def test_tampered_tensors_are_rejected(tmp_path):
    """A file with our header but inconsistent tensors (e.g. labels out of range) is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    _save(good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for change, match in [({"labels": torch.full((20,), 42)}, "out of range"),
                          ({"rounds": torch.zeros(5, dtype=torch.long)}, "rounds"),
                          ({"images": torch.zeros(20, 3, 16, 16)}, "channel")]:
        bad = tmp_path / "bad.safetensors"
        save_file({**tensors, **change}, str(bad), metadata=meta)
        with pytest.raises(FedLatentError, match=match):
            load_distilled(bad)
    bad = tmp_path / "v2.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "format_version": "2"})
    with pytest.raises(FedLatentError, match="version"):
        load_distilled(bad)


def test_feddf_transfer_names_are_kept(tmp_path):
    """FedDF's transfer-set reader expects float 'images' [N, C, H, W] (normalised) and optional 'labels'."""
    from safetensors.torch import load_file

    p = tmp_path / "d.safetensors"
    x, y = _save(p)
    t = load_file(str(p))
    assert t["images"].dtype == torch.float32 and t["images"].shape == x.shape and torch.equal(t["labels"], y)
