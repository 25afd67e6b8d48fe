"""DSA: replayable, siamese, differentiable, semantics of each transformation; ZCA whitening."""
from __future__ import annotations

import pytest
import torch

from fedlatent.distill.augment import DSA, GROUPS, ZCA, parse_strategy
from fedlatent.utils import FedLatentError


def _images(n=4, c=3, s=8, seed=0, dtype=torch.float64):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("siamese", [True, False])
@pytest.mark.parametrize("group", GROUPS)
def test_same_seed_replays_exactly(group, siamese):
    dsa = DSA(group, siamese=siamese)
    x = _images()
    outs = [dsa(x, 1234) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # and some seed gives a different transformation (all groups are random)
    assert any(not torch.equal(outs[0], dsa(x, s)) for s in range(20))


def test_default_strategy_single_mode_picks_one_group_per_call():
    dsa = DSA()
    gen = torch.Generator().manual_seed(0)
    seen = {dsa.draw(2, 8, 8, gen).groups for _ in range(200)}
    assert seen == {(g,) for g in GROUPS}
    assert DSA(mode="all").draw(2, 8, 8, gen).groups == GROUPS


@pytest.mark.parametrize("group", GROUPS)
def test_siamese_means_one_transformation_for_the_whole_batch(group):
    x = _images(n=1).expand(5, -1, -1, -1).contiguous()  # five copies of one image
    for seed in range(5):
        out = DSA(group, siamese=True)(x, seed)
        assert torch.allclose(out, out[:1].expand_as(out))


def test_per_image_draws_differ_across_the_batch():
    x = _images(n=1).expand(16, -1, -1, -1).contiguous()
    out = DSA("crop", siamese=False)(x, 3)
    assert not torch.allclose(out, out[:1].expand_as(out))


def test_flip_is_all_or_nothing_in_siamese_mode():
    x = _images(n=6)
    for seed in range(10):
        out = DSA("flip")(x, seed)
        flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(6)]
        kept = [torch.equal(out[i], x[i]) for i in range(6)]
        assert all(flipped) or all(kept)


def test_crop_is_a_zero_filled_integer_translation():
    dsa = DSA("crop", siamese=False)
    x = _images(n=5, s=8)
    d = dsa.draw(5, 8, 8, torch.Generator().manual_seed(7))
    out = dsa.apply(x, d)
    for b in range(5):
        sh, sw = int(d.values["shift_h"][b]), int(d.values["shift_w"][b])
        assert abs(sh) <= 1 and abs(sw) <= 1  # round(0.125 * 8) = 1
        for i in range(8):
            for j in range(8):
                src = (i + sh, j + sw)
                want = x[b, :, src[0], src[1]] if 0 <= src[0] < 8 and 0 <= src[1] < 8 else torch.zeros(3, dtype=x.dtype)
                assert torch.equal(out[b, :, i, j], want)


def test_cutout_zeroes_a_half_size_square_and_keeps_the_rest():
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    out = DSA("cutout")(x, 5)
    zeros = int((out == 0).sum())
    assert 0 < zeros <= 16 and torch.all((out == 0) | (out == 1))


def test_color_matches_the_dsa_formulas():
    dsa = DSA("color")
    x = _images(n=3)
    d = dsa.draw(3, 8, 8, torch.Generator().manual_seed(2))
    v = d.values
    y = x + float(v["brightness"])
    m = y.mean(1, keepdim=True)
    y = (y - m) * float(v["saturation"]) + m
    m = y.mean((1, 2, 3), keepdim=True)
    y = (y - m) * float(v["contrast"]) + m
    assert torch.allclose(dsa.apply(x, d), y)


@pytest.mark.parametrize("group", ["scale", "rotate"])
def test_identity_parameters_of_the_resampling_ops_give_back_the_image(group):
    dsa = DSA(group)
    x = _images(n=2)
    d = dsa.draw(2, 8, 8, torch.Generator().manual_seed(0))
    for k in d.values:
        d.values[k] = torch.ones(1, dtype=torch.float64) if k.startswith("scale") else torch.zeros(1, dtype=torch.float64)
    assert torch.allclose(dsa.apply(x, d), x, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_gradcheck_wrt_images(group):
    dsa = DSA(group, siamese=False)
    x = _images(n=2, c=2, s=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dsa(t, 11), (x,), eps=1e-6, atol=1e-6)


def test_strategy_validation():
    assert parse_strategy("none") == ()
    assert DSA("none")(_images(), 3) is not None
    with pytest.raises(FedLatentError, match="unknown DSA"):
        DSA("color_blur")
    with pytest.raises(FedLatentError):
        DSA(mode="several")


def test_zca_whitens_inverts_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = (torch.randn(400, 12, generator=g, dtype=torch.float64) @ mix).reshape(400, 3, 2, 2).float()
    z = ZCA(eps=1e-6).fit(x)
    w = z(x).reshape(400, -1).double()
    cov = (w - w.mean(0)).T @ (w - w.mean(0)) / 399
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-2)
    assert torch.allclose(z.inverse(z(x)), x, atol=1e-4)
    z.save(tmp_path / "zca.safetensors")
    z2 = ZCA.load(tmp_path / "zca.safetensors")
    assert torch.equal(z2(x), z(x))
    with pytest.raises(FedLatentError, match="not fitted"):
        ZCA()(x)
    with pytest.raises(FedLatentError, match="fitted on images"):
        z(torch.zeros(2, 3, 4, 4))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(FedLatentError):
        ZCA.load(tmp_path / "bad.safetensors")
