"""Upload screening: every kind of bad upload is rejected with a reason, good ones still aggregate."""
from __future__ import annotations

import logging

import numpy as np
import torch

from fedlatent.fl.aggregate import fedavg
from fedlatent.fl.base import Upload
from fedlatent.fl.validate import check_upload, update_norm, validate_uploads

SPEC = {"w": ((4, 3), torch.float32), "b": ((3,), torch.float32), "n": ((), torch.int64)}


def _ref() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor(5)}


def _good(cid: int, scale: float = 0.1, n: int = 20) -> Upload:
    g = torch.Generator().manual_seed(100 + cid)
    r = _ref()
    t = {"w": r["w"] + scale * torch.randn(4, 3, generator=g), "b": r["b"] + scale * torch.randn(3, generator=g),
         "n": torch.tensor(7)}
    return Upload(cid, t, n, {"train_loss": 1.0})


def _with(cid: int, **changes) -> Upload:
    u = _good(cid)
    for k, v in changes.items():
        if v is None:
            del u.tensors[k]
        else:
            u.tensors[k] = v
    return u


def test_each_bad_upload_is_rejected_with_its_reason_and_good_ones_aggregate(caplog):
    nan_w = _good(3).tensors["w"].clone()
    nan_w[1, 2] = float("nan")
    inf_b = _good(4).tensors["b"].clone()
    inf_b[0] = float("inf")
    cases = {  # client id -> (upload, expected reason fragment)
        3: (_with(3, w=nan_w), "NaN"),
        4: (_with(4, b=inf_b), "Inf"),
        5: (_with(5, w=torch.zeros(3, 4)), "shape"),
        6: (_with(6, w=_good(6).tensors["w"].double()), "dtype"),
        7: (_with(7, b=None), "missing keys"),
        8: (_with(8, extra=torch.zeros(1)), "unexpected keys"),
        9: (_good(9, scale=1e5), "absolute cap"),
        10: (_good(10, scale=1e3), "x median"),
        11: (Upload(99, _good(11).tensors, 20), "wrong client id"),
        12: (Upload(12, _good(12).tensors, 0), "num_samples"),
        13: (Upload(13, _good(13).tensors, 10_000), "claims 10000 samples"),
        14: (None, "not an Upload"),
        15: (_with(15, b=np.zeros(3, dtype=np.float32)), "not a tensor"),
    }
    good = [_good(0, n=10), _good(1, n=30), _good(2, n=60)]
    ids = [0, 1, 2, *cases]
    uploads = [*good, *(u for u, _ in cases.values())]
    ref = _ref()
    with caplog.at_level(logging.WARNING, logger="fedlatent.fl"):
        accepted, rejected = validate_uploads(uploads, ids, lambda cid: SPEC, references={c: ref for c in ids},
                                              client_sizes=[100] * 16, rnd=7)
    assert [u.client_id for u in accepted] == [0, 1, 2]
    reasons = {r.client_id: r.reason for r in rejected}
    assert set(reasons) == set(cases)
    for cid, (_, frag) in cases.items():
        assert frag in reasons[cid], (cid, reasons[cid])
        assert f"client {cid}: " in caplog.text
    assert "round 7" in caplog.text
    # the survivors still aggregate to the sample-weighted mean
    agg = fedavg([u.tensors for u in accepted], [u.num_samples for u in accepted])
    expect_w = (10 * good[0].tensors["w"].double() + 30 * good[1].tensors["w"].double()
                + 60 * good[2].tensors["w"].double()) / 100
    assert torch.allclose(agg["w"].double(), expect_w, atol=1e-6)


def test_duplicate_client_in_one_round_is_rejected():
    accepted, rejected = validate_uploads([_good(1), _good(1)], [1, 1], lambda c: SPEC)
    assert len(accepted) == 1 and len(rejected) == 1 and "duplicate" in rejected[0].reason


def test_median_rule_needs_three_uploads_and_honest_spread_passes():
    # Two uploads: no median rule (only the absolute cap applies).
    acc, rej = validate_uploads([_good(0, scale=0.01), _good(1, scale=50.0)], [0, 1], lambda c: SPEC,
                                references={0: _ref(), 1: _ref()})
    assert len(acc) == 2 and not rej
    # Honest clients whose updates differ 20x in size are all kept with the default factor.
    ups = [_good(i, scale=s) for i, s in enumerate([0.01, 0.05, 0.1, 0.2])]
    acc, rej = validate_uploads(ups, [0, 1, 2, 3], lambda c: SPEC, references={i: _ref() for i in range(4)})
    assert len(acc) == 4 and not rej
    # A custom, strict factor does reject the largest one.
    acc, rej = validate_uploads(ups, [0, 1, 2, 3], lambda c: SPEC, references={i: _ref() for i in range(4)},
                                norm_factor=2.0)
    assert [r.client_id for r in rej] == [3]


def test_update_norm_is_norm_of_the_delta():
    ref = _ref()
    up = {k: v.clone() for k, v in ref.items()}
    up["w"] = up["w"] + 3.0 * torch.eye(4, 3)  # delta norm sqrt(3 * 9) = sqrt(27)
    assert abs(update_norm(up, ref) - 27 ** 0.5) < 1e-5
    # without a reference it is the norm of the tensors themselves (integer tensors are ignored)
    expect = (ref["w"].double().pow(2).sum() + ref["b"].double().pow(2).sum()).sqrt().item()
    assert abs(update_norm(ref) - expect) < 1e-9


def test_check_upload_accepts_a_good_upload():
    assert check_upload(_good(2), 2, SPEC, max_samples=20) is None
    assert check_upload(Upload(2, _good(2).tensors, True), 2, SPEC) is not None  # bool is not a sample count
