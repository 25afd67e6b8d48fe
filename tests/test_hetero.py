"""Heterogeneous client architectures, the public/private split and their engine support."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedlatent.data import ImageData
from fedlatent.fl import FedAvg, FLConfig, run_simulation
from fedlatent.fl.client import train_client
from fedlatent.fl.feddf import FedDF
from fedlatent.fl.hetero import (arch_labels, architecture_counts, assign_architectures, largest_remainder,
                                 parse_client_models)
from fedlatent.fl.transfer import public_private_split
from fedlatent.utils import FedLatentError

A, B = "convnet:width=8", "convnet:width=4,depth=2"


@pytest.fixture(scope="module")
def small(digits16):
    return dataclasses.replace(digits16, x_train=digits16.x_train[:300], y_train=digits16.y_train[:300],
                               x_test=digits16.x_test[:100], y_test=digits16.y_test[:100])


# --- parsing and assignment -------------------------------------------------------------------

def test_parse_client_models_separators_and_options():
    assert parse_client_models("convnet@0.5,resnet18@0.3,vgg11@0.2") == [
        ("convnet", 0.5), ("resnet18", 0.3), ("vgg11", 0.2)]
    # a spec with comma-separated options; ';' or ',' after a weight separates entries
    assert parse_client_models("convnet:width=32,depth=2@0.6;vgg11@.4") == [
        ("convnet:width=32,depth=2", 0.6), ("vgg11", 0.4)]
    assert parse_client_models("convnet:width=8,depth=2@0.25, alexnet @ 0.75") == [
        ("convnet:width=8,depth=2", 0.25), ("alexnet", 0.75)]
    assert parse_client_models("resnet18") == [("resnet18", 1.0)]
    for bad, msg in [("convnet@x", "number"), ("nosuchnet@1", "unknown architecture"),
                     ("convnet@0.5;convnet@0.5", "twice"), ("convnet@0.5;vgg11", "no @WEIGHT"), ("@1", "empty")]:
        with pytest.raises(FedLatentError, match=msg):
            parse_client_models(bad)


def test_largest_remainder_exact_counts():
    assert largest_remainder([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert largest_remainder([0.5, 0.3, 0.2], 3) == [1, 1, 1]      # remainders .5 .9 .6 -> the two largest
    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]      # 3.5 2.1 1.4 -> +1 to the .5
    assert largest_remainder([1, 1, 1], 4) == [2, 1, 1]            # tie -> first listed
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(rng.integers(1, 6))
        k = int(rng.integers(1, 40))
        c = np.array(largest_remainder(w, k))
        ideal = w / w.sum() * k
        assert c.sum() == k and np.all(c >= np.floor(ideal)) and np.all(c <= np.floor(ideal) + 1)
    with pytest.raises(FedLatentError):
        largest_remainder([0, 0], 3)


def test_assignment_is_seeded_and_matches_fractions():
    text = "convnet@0.5,resnet18@0.3,vgg11@0.2"
    a = assign_architectures(text, 10, seed=1)
    assert a == assign_architectures(text, 10, seed=1)
    assert sorted(a.count(s) for s in ("convnet", "resnet18", "vgg11")) == [2, 3, 5]
    assert (a.count("convnet"), a.count("resnet18"), a.count("vgg11")) == (5, 3, 2)
    others = [assign_architectures(text, 10, seed=s) for s in range(2, 8)]
    assert any(o != a for o in others)  # the seed moves who gets what
    assert all((o.count("convnet"), o.count("resnet18"), o.count("vgg11")) == (5, 3, 2) for o in others)
    # integer counts summing to K
    c = assign_architectures("convnet@6;vgg11@4", 10, seed=0)
    assert (c.count("convnet"), c.count("vgg11")) == (6, 4)
    assert architecture_counts([("a", 0.5), ("b", 0.5)], 3) == [2, 1]
    with pytest.raises(FedLatentError, match="sum"):
        assign_architectures("convnet@0.5;vgg11@0.3", 10, seed=0)
    assert assign_architectures("vgg11", 3, seed=0) == ["vgg11"] * 3
    assert assign_architectures(None, 3, seed=0) is None


def test_json_mapping_file(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"0": "convnet", "2": "vgg11", "1": "convnet:width=8"}))
    assert assign_architectures(str(f), 3, seed=0) == ["convnet", "convnet:width=8", "vgg11"]
    with pytest.raises(FedLatentError, match="every client"):
        assign_architectures(str(f), 4, seed=0)
    f.write_text(json.dumps({"0": "convnet", "x": "vgg11"}))
    with pytest.raises(FedLatentError, match="not an integer"):
        assign_architectures(str(f), 2, seed=0)
    f.write_text("[1, 2]")
    with pytest.raises(FedLatentError, match="JSON object"):
        assign_architectures(str(f), 2, seed=0)
    with pytest.raises(FedLatentError, match="cannot read"):
        assign_architectures(str(tmp_path / "missing.json"), 2, seed=0)


def test_arch_labels_are_unique_and_short():
    assert arch_labels(["convnet", "resnet18", "vgg11"]) == {"convnet": "convnet", "resnet18": "resnet18",
                                                               "vgg11": "vgg11"}
    labels = arch_labels([A, B, "vgg11"])
    assert labels == {A: "convnet_width8", B: "convnet_width4_depth2", "vgg11": "vgg11"}


# --- public split -----------------------------------------------------------------------------

def test_public_private_split_disjoint_stratified_seeded():
    y = np.repeat(np.arange(4), [40, 30, 20, 10])
    pub, priv = public_private_split(y, 0.2, seed=3)
    assert len(pub) == 20 and len(np.intersect1d(pub, priv)) == 0
    assert np.array_equal(np.sort(np.concatenate([pub, priv])), np.arange(100))
    assert np.bincount(y[pub], minlength=4).tolist() == [8, 6, 4, 2]
    pub2, _ = public_private_split(y, 0.2, seed=3)
    pub3, _ = public_private_split(y, 0.2, seed=4)
    assert np.array_equal(pub, pub2) and not np.array_equal(pub, pub3)
    e, p = public_private_split(y, 0.0, seed=3)
    assert len(e) == 0 and np.array_equal(p, np.arange(100))
    with pytest.raises(FedLatentError):
        public_private_split(y, 1.0, seed=0)


def _indexed_data(n: int = 120) -> ImageData:
    """Images whose pixels all equal their training index (so a client's data reveals its indices)."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    y = torch.arange(n) % 3
    return ImageData("indexed", x, y, x[:30].clone(), y[:30].clone(), ["a", "b", "c"], (0.0,), (1.0,))


def test_engine_public_split_is_disjoint_from_client_data():
    seen: dict[int, set] = {}

    class Spy(FedAvg):
        def client_update(self, ctx, rnd, client_id, payload, data):
            seen.setdefault(client_id, set()).update(data.x[:, 0, 0, 0].long().tolist())
            return super().client_update(ctx, rnd, client_id, payload, data)

    cfg = FLConfig(clients=3, rounds=1, participation=1.0, model="convnet:width=4", alpha=1.0, min_size=5,
                   public_fraction=0.25, local_epochs=0)
    res = run_simulation(Spy(), _indexed_data(), cfg, None, progress=False)
    ctx = res.strategy.ctx
    public = set(ctx.public_x[:, 0, 0, 0].long().tolist())
    private = set().union(*seen.values())
    assert len(public) == 30 and not public & private and public | private == set(range(120))
    assert sum(ctx.client_sizes) == 90 and sorted(len(v) for v in seen.values()) == sorted(ctx.client_sizes)


# --- heterogeneous uploads -----------------------------------------------------------------------

def test_fedavg_refuses_mixed_architectures(small):
    cfg = FLConfig(clients=4, rounds=1, model=A, client_models=f"{A}@0.5;{B}@0.5")
    with pytest.raises(FedLatentError, match="one architecture"):
        run_simulation(FedAvg(), small, cfg, None, progress=False)
    # a uniform assignment equal to --model is fine
    ok = FLConfig(clients=2, rounds=0, model=A, client_models=A)
    run_simulation(FedAvg(), small, ok, None, progress=False)


def test_upload_with_wrong_architecture_is_rejected(small):
    class WrongArch(FedDF):
        def client_update(self, ctx, rnd, client_id, payload, data):
            if client_id == self.liar:  # trains (and uploads) the other architecture
                other = B if ctx.arch_of(client_id) == A else A
                return train_client(ctx, rnd, self.other_payload[other], data, spec=other)
            return super().client_update(ctx, rnd, client_id, payload, data)

        def setup(self, ctx):
            super().setup(ctx)
            self.liar = 1
            self.other_payload = {a: {k: v.clone() for k, v in m.state_dict().items()} for a, m in self.students.items()}

    cfg = FLConfig(clients=4, rounds=1, participation=1.0, model=A, client_models=f"{A}@0.5;{B}@0.5", alpha=1.0,
                   min_size=5, batch_size=64)
    res = run_simulation(WrongArch(distill_steps=0), small, cfg, None, progress=False)
    assert res.rejected == 1 and res.rejections[0]["client"] == 1
    assert "shape" in res.rejections[0]["reason"] or "keys" in res.rejections[0]["reason"]
    assert res.history[-1]["accepted"] == 3
    # the per-client spec is what validation checks against
    st = res.strategy
    specs = {cid: st.expected_upload(cid) for cid in range(4)}
    for cid in range(4):
        ref = st.students[st.ctx.arch_of(cid)].state_dict()
        assert specs[cid] == {k: (tuple(v.shape), v.dtype) for k, v in ref.items()}
