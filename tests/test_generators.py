"""Built-in style generator, latent spaces F_k / W+ / pixel, checkpoints, manifest, public split, pretrain."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlatent.data import load_dataset, normalize
from fedlatent.generators import (
    BuiltinConfig, BuiltinStyleGenerator, LatentSet, as_generator, load_builtin, load_generator, parse_space,
    save_builtin,
)
from fedlatent.generators.builtin import StyleLayer
from fedlatent.generators.registry import fetch, write_manifest_entry
from fedlatent.generators.train import (
    TrainConfig, diff_augment, parse_public_split, private_split_indices, public_split_indices, train_generator,
)
from fedlatent.synthetic import SyntheticSet
from fedlatent.utils import FedLatentError, sha256_file, torch_generator

MEAN, STD = (0.3,), (0.4,)


def tiny_generator(res=16, channels=1, dtype=torch.float64, seed=0) -> BuiltinStyleGenerator:
    torch.manual_seed(seed)
    G = BuiltinStyleGenerator(img_resolution=res, img_channels=channels, c_dim=4, z_dim=8, w_dim=16, embed_dim=8,
                              channel_base=64, channel_max=8)
    return G.to(dtype).eval()


@pytest.fixture(scope="module")
def gen():
    return as_generator(tiny_generator())


# --- generator structure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("res,layers", [(16, 6), (28, 6), (32, 8)])
def test_layouts(res, layers):
    G = BuiltinStyleGenerator(img_resolution=res, img_channels=3, c_dim=10)
    g = as_generator(G)
    assert g.num_layers == layers and g.num_ws == layers + 1
    img = g.generate(torch.randn(2, g.z_dim), torch.tensor([1, 7]))
    assert img.shape == (2, 3, res, res)
    assert G.num_parameters() <= 1_500_000


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 5, 3), (2, 1, 1, 2), (1, 1, 1, 1)])
def test_upsampling_backward_is_the_interpolation_adjoint(shape):
    """The dense backward that compiled rendering uses for 2x bilinear upsampling (builtin._Upsample2x) equals
    F.interpolate's own in float64 (the adjoint of the same linear map), at odd, one-pixel and non-square sizes;
    its forward is F.interpolate itself."""
    from fedlatent.generators.builtin import _Upsample2x, upsample2x

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    got = _Upsample2x.apply(x)
    assert torch.equal(got, want) and torch.equal(upsample2x(x), want)
    g = torch.randn_like(want)
    (gw,) = torch.autograd.grad(want, x, g)
    (gg,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(gg, gw, rtol=0, atol=1e-13)
    assert gw.abs().sum() > 0


def test_modulated_conv_equals_grouped_weight_form():
    """StyleGAN2 Eq. 1-3: per-sample modulated + demodulated weights, applied as a grouped convolution."""
    torch.manual_seed(1)
    layer = StyleLayer(w_dim=5, in_channels=3, out_channels=4, resolution=6).double()
    with torch.no_grad():
        layer.bias.normal_()
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    s = layer.affine(w)
    wt = layer.weight * layer.weight_gain
    wmod = wt[None] * s[:, None, :, None, None]  # [N, out, in, k, k]
    wdemod = wmod * (wmod.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    y = F.conv2d(x.reshape(1, 6, 6, 6), wdemod.reshape(8, 3, 3, 3), padding=1, groups=2).reshape(2, 4, 6, 6)
    want = F.leaky_relu(y + layer.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)
    torch.testing.assert_close(layer(x, w), want, rtol=0, atol=1e-12)


def test_truncation_moves_towards_class_mean(gen):
    G = gen.module
    c = F.one_hot(torch.tensor([0, 1]), 4).double()
    z = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        avg = G.mapping.w_avg.clone()
        w1 = G.mapping(z, c)[:, 0]
        w0 = G.mapping(z, c, truncation_psi=0.0)[:, 0]
        wh = G.mapping(z, c, truncation_psi=0.5)[:, 0]
        G.mapping.w_avg.zero_()
    torch.testing.assert_close(w0, c @ avg)  # psi = 0: the class's mean w
    torch.testing.assert_close(wh, 0.5 * (w0 + w1))


# --- latent spaces -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 4, 5, 6])
def test_identity_every_space(gen, k):
    """Render from (ws, f_k) obtained from (z, c) == direct generation, float64, for every k and W+."""
    ls = LatentSet.initialize(gen, k, ipc=2, seed=5, clip=None, mean=MEAN, std=STD, chunk_size=3)
    assert isinstance(ls, SyntheticSet)
    direct = gen.module(ls.z_init, F.one_hot(ls.labels, 4).double())
    torch.testing.assert_close(ls.render(), normalize((direct + 1) / 2, MEAN, STD), rtol=0, atol=1e-12)
    assert ls.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("k", [-1, 0, 2, 6])
def test_gradients_reach_only_f_and_later_ws(gen, k):
    """Parameters are exactly f_k and ws[:, 1+k:]; their gradients equal autograd through the full W+ tensor,
    whose first 1+k rows get exactly zero gradient (the earlier ws are not parameters)."""
    ls = LatentSet.initialize(gen, k, ipc=1, seed=1, clip=None, mean=MEAN, std=STD)
    g_img = torch.randn(len(ls), 1, 16, 16, dtype=torch.float64)
    ls.backward(g_img)
    if k == -1:
        assert [p.shape for p in ls.parameters()] == [(4, gen.num_ws, gen.w_dim)]
        ws_full = ls.ws.detach().clone().requires_grad_(True)
        (normalize(gen.to_unit(gen.synthesis(ws_full)), MEAN, STD) * g_img).sum().backward()
        torch.testing.assert_close(ls.ws.grad, ws_full.grad, rtol=1e-10, atol=1e-12)
        return
    assert ls.ws.shape == (4, gen.num_ws - 1 - k, gen.w_dim) and ls.f is not None
    ws_full = ls.full_ws().clone().requires_grad_(True)
    f = ls.f.detach().clone().requires_grad_(True)
    img = gen.from_f(f, ws_full[:, 1 + k:], k)
    (normalize(gen.to_unit(img), MEAN, STD) * g_img).sum().backward()
    gw = ws_full.grad if ws_full.grad is not None else torch.zeros_like(ws_full)  # k = L: no w is used
    assert torch.count_nonzero(gw[:, : 1 + k]) == 0
    torch.testing.assert_close(ls.ws.grad, gw[:, 1 + k:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ls.f.grad, f.grad, rtol=1e-10, atol=1e-12)
    if k < gen.num_layers:
        assert ls.ws.grad.abs().sum() > 0 and ls.f.grad.abs().sum() > 0
    gen.module.zero_grad(set_to_none=True)
    ls.backward(g_img)
    assert all(p.grad is None for p in gen.module.parameters())  # the generator itself is never updated


@pytest.mark.parametrize("k", [-1, 3])
def test_chunked_gradient_equals_single_pass(gen, k):
    a = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=1000, mean=MEAN, std=STD)
    b = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=5, mean=MEAN, std=STD)
    torch.testing.assert_close(a.render(), b.render(), rtol=0, atol=1e-13)
    g = torch.randn(len(a), 1, 16, 16, dtype=torch.float64)
    a.backward(g)
    b.backward(g)
    b.backward(g)  # accumulates like autograd
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(2 * pa.grad, pb.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [-1, 3])
def test_render_once_is_bitwise_the_re_render(gen, k):
    """A one-chunk set back-propagates through the graph render() kept: bitwise the gradient of the re-rendering
    backward (no render() first); latents changed in place after render() make backward re-render from the new
    values; a second backward (graph used up) accumulates the re-rendered gradient."""
    g = torch.randn(12, 1, 16, 16, dtype=torch.float64)  # ipc 3 x the generator's 4 classes
    once = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=64, mean=MEAN, std=STD)
    twice = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=64, mean=MEAN, std=STD)
    assert torch.equal(once.render(), twice.render())
    assert once._graph is not None
    twice._graph = None  # drop it: twice.backward re-renders
    once.backward(g)
    twice.backward(g)
    for pa, pb in zip(once.parameters(), twice.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    once.backward(g)  # no graph left: re-rendered, accumulated
    for pa, pb in zip(once.parameters(), twice.parameters()):
        assert torch.equal(pa.grad, 2 * pb.grad)

    stale = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=64, mean=MEAN, std=STD)
    fresh = LatentSet.initialize(gen, k, ipc=3, seed=2, chunk_size=64, mean=MEAN, std=STD)
    stale.render()
    for a, b in zip(stale.parameters(), fresh.parameters()):
        with torch.no_grad():
            a.add_(0.1)
            b.add_(0.1)
    stale.backward(g)
    fresh.backward(g)
    for pa, pb in zip(stale.parameters(), fresh.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    with pytest.raises(FedLatentError, match="gradient shape"):
        stale.render()
        stale.backward(g[:, :, :8])


def test_compiled_rendering_errors_and_fallback(gen, monkeypatch, request):
    """compile=True without a compiler: a one-line FedLatentError naming the cause. A compiler failure at run time:
    a warning, and bitwise the eager images and gradients."""
    from fedlatent import compiling

    monkeypatch.setattr(compiling, "compile_unavailable", lambda: "no C++ compiler found (test)")
    with pytest.raises(FedLatentError, match="compiled rendering needs.*C\\+\\+ compiler"):
        LatentSet.initialize(gen, 2, ipc=1, seed=0, mean=MEAN, std=STD, compile=True)
    pixels = LatentSet.initialize(None, "pixel", ipc=1, num_classes=2, channels=1, image_size=8, seed=0, compile=True)
    assert pixels.compile is False  # nothing to compile
    monkeypatch.undo()
    request.getfixturevalue("broken_compiler")
    a = LatentSet.initialize(gen, 2, ipc=2, seed=1, mean=MEAN, std=STD, compile=True)
    b = LatentSet.initialize(gen, 2, ipc=2, seed=1, mean=MEAN, std=STD)
    with pytest.warns(RuntimeWarning, match="generator's rendering failed.*uncompiled"):
        xa = a.render()
    assert compiling.STATE["failed"] and torch.equal(xa, b.render())
    g = torch.randn_like(xa)
    a.backward(g)
    b.backward(g)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


@pytest.mark.slow
def test_compiled_rendering_matches_eager(monkeypatch):
    """compile=True (torch.compile of the rendering) gives the eager images and latent gradients within float32
    rounding (rel. 1e-4), renders through the compiled graph (no fallback), and one compiled graph serves two sets."""
    from fedlatent import compiling

    if compiling.compile_unavailable():
        pytest.skip(compiling.compile_unavailable())
    monkeypatch.setitem(compiling.STATE, "failed", False)
    from torch._dynamo.utils import counters

    counters.clear()
    G = as_generator(tiny_generator(dtype=torch.float32, channels=3))
    g = torch.randn(8, 3, 16, 16)
    for seed in (0, 1):
        a = LatentSet.initialize(G, 2, ipc=2, seed=seed, mean=MEAN * 3, std=STD * 3, compile=True)
        b = LatentSet.initialize(G, 2, ipc=2, seed=seed, mean=MEAN * 3, std=STD * 3)
        torch.testing.assert_close(a.render(), b.render(), rtol=1e-4, atol=1e-5)
        b.render()
        a.backward(g)
        b.backward(g)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert float((pa.grad - pb.grad).norm() / pb.grad.norm()) < 1e-4
    assert not compiling.STATE["failed"]
    assert counters["frames"]["ok"] >= 1  # it really ran compiled (not the eager fallback)
    assert counters["stats"]["unique_graphs"] == 1  # the second set reused the first one's graph


def test_backward_matches_finite_differences(gen):
    """d<g, render(f)>/df_k from backward() vs central differences (float64)."""
    ls = LatentSet.initialize(gen, 2, ipc=1, seed=4, mean=MEAN, std=STD)
    g = torch.randn(len(ls), 1, 16, 16, dtype=torch.float64)
    ls.backward(g)
    gen_ = torch.Generator().manual_seed(0)
    for p in ls.parameters():
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=gen_)) for s in p.shape)
            eps = 1e-6
            with torch.no_grad():
                p[idx] += eps
                up = (ls.render() * g).sum()
                p[idx] -= 2 * eps
                down = (ls.render() * g).sum()
                p[idx] += eps
            assert abs((up - down).item() / (2 * eps) - p.grad[idx].item()) < 1e-6 * max(1.0, abs(p.grad[idx].item()))


def test_clip_mean_w_and_param_groups(gen):
    ls = LatentSet.initialize(gen, 1, ipc=2, seed=0, clip=0.05, mean=MEAN, std=STD)
    assert ls.f.abs().max() <= 0.05 + 1e-12 and (ls.f.abs() == 0.05).any()
    m = LatentSet.initialize(gen, "F1", ipc=2, seed=0, init="mean_w", mean_w_samples=64, mean=MEAN, std=STD)
    assert torch.equal(m.ws[0], m.ws[1]) and not torch.equal(m.ws[0], m.ws[2])  # one mean w per class
    c = torch.full((64,), 0)
    z = torch.randn(64, 8, generator=torch_generator(0, "latent-init", "mean_w"), dtype=torch.float64)
    torch.testing.assert_close(m.full_ws()[0], gen.mapping(z, c).mean(0))
    groups = ls.param_groups(lr_w=2.0, lr_f=3000.0)
    assert [(g["name"], g["lr"], g["momentum"]) for g in groups] == [("w", 2.0, 0.5), ("f", 3000.0, 0.5)]
    opt = torch.optim.SGD(groups, lr=1.0)
    ls.backward(torch.ones(len(ls), 1, 16, 16, dtype=torch.float64))
    before = [p.detach().clone() for p in ls.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, ls.parameters()))
    assert [g["name"] for g in LatentSet.initialize(gen, "W+", ipc=1).param_groups()] == ["w"]


def test_pixel_space_is_identity():
    ls = LatentSet.initialize(None, "pixel", ipc=2, num_classes=3, channels=1, image_size=8, seed=0)
    assert ls.render().shape == (6, 1, 8, 8)
    g = torch.randn(6, 1, 8, 8)
    ls.backward(g)
    torch.testing.assert_close(ls.images.grad, g)
    assert ls.param_groups(lr_f=100.0)[0]["name"] == "pixels"


def test_resize_to_dataset_size(gen):
    ls = LatentSet.initialize(gen, 0, ipc=1, seed=0, image_size=8, mean=MEAN, std=STD)
    assert ls.render().shape == (4, 1, 8, 8)
    ls.backward(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert ls.f.grad is not None


def test_state_dict_round_trip(gen):
    a = LatentSet.initialize(gen, 2, ipc=1, seed=0, mean=MEAN, std=STD)
    b = LatentSet.initialize(gen, 2, ipc=1, seed=9, mean=MEAN, std=STD)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.render(), b.render(), rtol=0, atol=0)
    with pytest.raises(FedLatentError, match="latent space"):
        LatentSet.initialize(gen, 3, ipc=1).load_state_dict(a.state_dict())


def test_parse_space_and_errors(gen):
    assert [parse_space(s) for s in ("F0", "f12", 3, "W+", "wp", -1, "pixel")] == [0, 12, 3, -1, -1, -1, "pixel"]
    for bad in ("G2", "F-2", -3, "latent"):
        with pytest.raises(FedLatentError, match="unknown latent space"):
            parse_space(bad)
    with pytest.raises(FedLatentError, match=r"unknown latent space F7: .* 0\.\.6"):
        LatentSet.initialize(gen, 7, ipc=1)
    with pytest.raises(FedLatentError, match="channel"):
        LatentSet.initialize(gen, 0, ipc=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    ls = LatentSet.initialize(gen, 0, ipc=1)
    with pytest.raises(FedLatentError, match="gradient must have shape"):
        ls.backward(torch.zeros(3, 1, 16, 16))


# --- checkpoints and manifest ------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    G = tiny_generator(dtype=torch.float32)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    p = tmp_path / "g.safetensors"
    save_builtin(G, p, info={"command": "x"})
    H = load_builtin(p)
    z, c = torch.randn(3, 8), F.one_hot(torch.tensor([0, 1, 3]), 4).float()
    torch.testing.assert_close(H(z, c, truncation_psi=0.7), G(z, c, truncation_psi=0.7), rtol=0, atol=0)
    assert H.cfg == G.cfg
    assert json.loads(json.dumps(H.cfg.__dict__))["channel_max"] == 8


def test_corrupted_checkpoint_errors(tmp_path):
    G = tiny_generator(dtype=torch.float32)
    p = tmp_path / "g.safetensors"
    save_builtin(G, p)
    raw = p.read_bytes()
    for name, data in [("truncated", raw[: len(raw) // 2]), ("header", b"\xff" * 8 + raw[8:]), ("empty", b"")]:
        q = tmp_path / f"{name}.safetensors"
        q.write_bytes(data)
        with pytest.raises(FedLatentError) as e:
            load_builtin(q)
        assert "\n" not in str(e.value) and str(q) in str(e.value)
    with pytest.raises(FedLatentError, match="does not exist"):
        load_builtin(tmp_path / "missing.safetensors")


def test_load_generator_via_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLATENT_PRETRAINED", str(tmp_path))
    monkeypatch.setenv("FEDLATENT_CACHE", str(tmp_path / "cache"))
    G = tiny_generator(dtype=torch.float32)
    p = tmp_path / "tiny.safetensors"
    save_builtin(G, p)
    write_manifest_entry("tiny", {"kind": "builtin", "file": "tiny.safetensors", "sha256": sha256_file(p)})
    write_manifest_entry("remote", {"kind": "stylegan-xl", "url": "http://127.0.0.1:9/remote.pkl", "sha256": None})
    g = load_generator("tiny")
    assert g.name == "tiny" and g.num_layers == 6
    assert load_generator(str(p)).num_ws == 7
    with pytest.raises(FedLatentError, match="not downloaded yet"):
        load_generator("remote")
    with pytest.raises(FedLatentError, match="cannot download remote"):
        fetch("remote", progress=False)
    with pytest.raises(FedLatentError, match="unknown generator"):
        load_generator("nope")
    p.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(FedLatentError, match="sha256 differs"):
        load_generator("tiny")


# --- public split, augmentation, training ------------------------------------------------------------------------
def test_public_split():
    a = public_split_indices(1000, 0.1, seed=3)
    assert len(a) == 100 and np.array_equal(a, np.sort(a)) and np.array_equal(a, public_split_indices(1000, 0.1, 3))
    assert not np.array_equal(a, public_split_indices(1000, 0.1, 4))
    b = private_split_indices(1000, 0.1, seed=3)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 1000
    assert parse_public_split("0.2", 500) == (0.2, 0) and parse_public_split("50:seed=7", 500) == (0.1, 7)
    for bad in ("abc", "0", "1000"):
        with pytest.raises(FedLatentError):
            parse_public_split(bad, 500)


def test_translation_is_an_exact_shift():
    x = torch.zeros(8, 1, 16, 16)
    x[:, 0, 8, 8] = 1.0
    y = diff_augment(x, ("translation",), torch.Generator().manual_seed(0))
    for img in y:
        (r, c), = torch.nonzero(img[0]).tolist()
        assert abs(r - 8) <= 2 and abs(c - 8) <= 2 and img.sum() == 1
    xr = torch.randn(4, 3, 8, 8, requires_grad=True)
    diff_augment(xr, ("color", "translation", "cutout"), torch.Generator().manual_seed(1)).sum().backward()
    assert xr.grad is not None


def test_pretrain_smoke(tmp_path):
    data = load_dataset("digits", resize=16)
    idx = public_split_indices(len(data.y_train), 0.05, 0)
    cfg = BuiltinConfig(img_resolution=16, img_channels=1, c_dim=10, z_dim=8, w_dim=16, embed_dim=8,
                        channel_base=64, channel_max=8, dataset="digits")
    out = tmp_path / "g.safetensors"
    res = train_generator(data, idx, cfg, TrainConfig(steps=3, batch_size=8, d_channels=8, save_every=2), out=out,
                          info={"public": len(idx)}, progress=False)
    assert res.steps_done == 3 and out.is_file()
    g = load_generator(str(out))
    assert g.generate(torch.randn(2, 8), torch.tensor([0, 9])).shape == (2, 1, 16, 16)
    res2 = train_generator(data, idx, cfg, TrainConfig(steps=3, batch_size=8, d_channels=8), progress=False)
    z, c = torch.randn(2, 8), F.one_hot(torch.tensor([1, 2]), 10).float()
    torch.testing.assert_close(res.generator(z, c), res2.generator(z, c))  # one seed fixes everything


def test_cli_pretrain_and_list(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fedlatent.cli import main

    monkeypatch.setenv("FEDLATENT_PRETRAINED", str(tmp_path))
    out = tmp_path / "d.safetensors"
    r = CliRunner().invoke(main, ["pretrain", "--dataset", "digits", "--steps", "2", "--batch-size", "4",
                                  "--public-split", "0.05:seed=2", "--channel-base", "32", "--channel-max", "8",
                                  "--z-dim", "8", "--w-dim", "16", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "MANIFEST.json").read_text())["models"]["d"]
    assert entry["sha256"] == sha256_file(out) and entry["public_split"]["seed"] == 2
    assert entry["resolution"] == 16 and entry["num_layers"] == 6 and "pretrain" in entry["command"]
    assert "pretrain summary" in r.output and "d.safetensors" in r.output and "MANIFEST.json" in r.output
    r = CliRunner().invoke(main, ["pretrained", "list"])
    assert r.exit_code == 0 and "d " in r.output
    r = CliRunner().invoke(main, ["pretrained", "fetch", "nope"])
    assert r.exit_code == 2 and "unknown pretrained generator" in r.output
