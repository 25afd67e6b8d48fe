"""Byte-reproducible safetensors artefacts: the same content always gives the same file bytes.

safetensors writes the header's ``__metadata__`` in a randomised (Rust HashMap) order, so before the canonical
writer two saves of one distilled set differed in a few header bytes although tensors and metadata were equal.
"""
from __future__ import annotations

import json
import struct

import torch

from fedlatent.export import load_distilled, save_distilled
from fedlatent.utils import safetensors_bytes, save_safetensors


def _header(raw: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n]


def test_same_content_same_bytes_whatever_the_metadata_order():
    t = {"b": torch.arange(6, dtype=torch.int64), "a": torch.randn(3, 2), "h": torch.ones(5, dtype=torch.float16)}
    meta = {f"key{i}": f"value {i}" for i in range(16)}
    outs = {safetensors_bytes(t, meta) for _ in range(8)}
    outs.add(safetensors_bytes(dict(reversed(list(t.items()))), dict(reversed(list(meta.items())))))
    assert len(outs) == 1
    raw = outs.pop()
    n, header = _header(raw)
    assert n % 8 == 0 and (8 + n) % 8 == 0
    assert list(json.loads(header)["__metadata__"]) == sorted(meta)


def test_canonical_file_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    t = {"x": torch.randn(4, 3), "y": torch.arange(4)}
    meta = {"zeta": "ü ☃ \"quoted\" \n newline", "alpha": "1"}
    save_safetensors(tmp_path / "f.safetensors", t, meta)
    back = load_file(str(tmp_path / "f.safetensors"))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
    # no metadata: the library's own bytes (already canonical) are kept
    from safetensors.torch import save

    assert safetensors_bytes(t) == save(t)


def test_distilled_set_is_byte_identical_across_saves(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    kw = dict(dataset="toy", class_names=["a", "b", "c"], mean=[0.5], std=[0.25], ipc=2, seed=3,
              extra={"options": {"z": 1, "a": [1, 2]}, "method": "feddgm"})
    save_distilled(tmp_path / "1.safetensors", x, y, **kw)
    kw["extra"] = {"method": "feddgm", "options": {"a": [1, 2], "z": 1}}  # same content, other insertion order
    save_distilled(tmp_path / "2.safetensors", x, y, **kw)
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    ds, meta = load_distilled(tmp_path / "2.safetensors")
    assert torch.equal(ds.images, x) and meta["extra"]["options"] == {"a": [1, 2], "z": 1}
