"""Generator quality metrics, exact resume of pretraining, the random prior, new domains (npz, any class count)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from fedlatent.data import load_dataset
from fedlatent.generators import load_generator
from fedlatent.generators.builtin import BuiltinConfig
from fedlatent.generators.quality import QualityConfig, QualityEvaluator, frechet_distance, prdc
from fedlatent.generators.registry import complete_generator_spec, no_generator_message, parse_random_spec
from fedlatent.generators.train import MinibatchStd, TrainConfig, public_split_indices, train_generator
from fedlatent.generators.train_state import read_train_state
from fedlatent.utils import FedLatentError


# --- the metrics against hand-computed values ----------------------------------------------------------------------
def test_prdc_hand_computed_example():
    """Real {0, 1, 2, 3}, fake {0.5, 10}, k = 1: every real 1-NN radius is 1; the fake radii are 9.5.

    0.5 lies in the balls of 0 and 1 (distance 0.5 < 1), 10 in none: precision 1/2, density (2 + 0) / (1 * 2) = 1,
    coverage 2/4 (reals 0 and 1 have a fake in their ball); every real is within 9.5 of 0.5: recall 1.
    """
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    r = prdc(real, fake, k=1)
    assert r == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}
    # the ball is open: a fake exactly at the radius is outside
    assert prdc(real, torch.tensor([[4.0], [40.0]]), k=1)["precision"] == 0.0
    # k = 2: radii of the reals 0..3 are 2, 1, 1, 2; fakes 2.5 and 2.6 lie in the balls of 2 and 3 only
    r2 = prdc(real, torch.tensor([[2.5], [2.6], [20.0]]), k=2)
    assert r2["precision"] == pytest.approx(2 / 3) and r2["density"] == pytest.approx((2 + 2) / (2 * 3))
    assert r2["coverage"] == pytest.approx(2 / 4)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)
    # scaling by s: Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr S  (mean shifts by (s - 1) mu as well)
    s = 3.0
    expect = (1 - s) ** 2 * float(torch.cov(a.T).trace()) + float(((s - 1) * a.mean(0)).square().sum())
    assert frechet_distance(a, s * a) == pytest.approx(expect, rel=1e-8)
    # against the textbook formula with a general matrix square root
    scipy = pytest.importorskip("scipy.linalg")
    b = torch.randn(300, 3, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.3, 0], [0, 2.0, 0.1], [0, 0, 0.5]],
                                                                             dtype=torch.float64)
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + np.trace(sa + sb - 2 * scipy.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_minibatch_std_feature():
    x = torch.zeros(4, 2, 3, 3)
    x[2:] = 1.0  # groups (0, 2) and (1, 3): each holds a 0 and a 1 -> std 0.5
    y = MinibatchStd(group=2)(x)
    assert y.shape == (4, 3, 3, 3) and torch.allclose(y[:, 2], torch.full((4, 3, 3), 0.5), atol=1e-4)
    assert torch.allclose(MinibatchStd(group=2)(torch.ones(4, 2, 3, 3))[:, 2], torch.zeros(4, 3, 3), atol=1e-3)


# --- the evaluator: real-vs-real gives the ceiling, a collapsed generator falls -----------------------------------
class _ImagePool:
    """A 'generator' drawing images of the requested class from a pool of real images (or one fixed image)."""

    def __init__(self, x01, y, num_classes, collapsed=False):
        self.x01, self.y, self.c_dim, self.collapsed = x01, y, num_classes, collapsed
        self.img_channels, self.img_resolution = x01.shape[1], x01.shape[-1]

    def sample(self, labels, generator=None, truncation_psi=1.0):
        if self.collapsed:
            return self.x01[:1].expand(len(labels), -1, -1, -1).clone()
        out = []
        for c in labels.tolist():
            idx = torch.nonzero(self.y == c).flatten()
            out.append(self.x01[idx[torch.randint(0, len(idx), (1,), generator=generator)]])
        return torch.cat(out)

    def to_unit(self, x):
        return x


@pytest.fixture(scope="module")
def digits_eval(tmp_path_factory):
    data = load_dataset("digits", resize=16)
    cfg = QualityConfig(per_class=18, nearest_k=3, classifier="convnet:width=16", classifier_steps=100,
                        gan_train_per_class=10, gan_train_arch="convnet:width=16", gan_train_epochs=15)
    return data, QualityEvaluator(data, cfg, cache=tmp_path_factory.mktemp("qcache"))


def test_metrics_reach_the_ceiling_on_real_images_and_fall_on_a_collapsed_generator(digits_eval):
    from fedlatent.data import denormalize

    data, ev = digits_eval
    x01 = denormalize(data.x_train, data.mean, data.std).clamp(0, 1)
    real, ceil = ev(_ImagePool(x01, data.y_train, 10)), ev.ceiling
    assert ceil["fidelity"] > 0.8 and ceil["coverage"] > 0.8 and ceil["gan_train"] > 0.3
    for k in ("fidelity", "precision", "recall", "coverage"):
        assert real[k] >= ceil[k] - 0.15, k
    assert real["fd"] < 3 * ceil["fd"] and real["gan_train"] >= ceil["gan_train"] - 0.15
    collapsed = ev(_ImagePool(x01, data.y_train, 10, collapsed=True))
    assert collapsed["coverage"] < 0.2 and collapsed["recall"] < 0.2 and collapsed["fidelity"] <= 0.2
    assert collapsed["fd"] > 5 * ceil["fd"] and collapsed["gan_train"] < 0.25


def test_evaluator_checks_the_generator_shape(digits_eval):
    data, ev = digits_eval
    with pytest.raises(FedLatentError, match="classes"):
        ev.images(_ImagePool(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), 4))
    with pytest.raises(FedLatentError, match="px"):
        ev.images(_ImagePool(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), 10))


def test_cli_pretrained_eval(tmp_path, monkeypatch):
    from fedlatent.cli import main

    monkeypatch.setenv("FEDLATENT_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["pretrained", "eval", "digits", "--per-class", "10", "--nearest-k", "3",
                                  "--classifier", "convnet:width=8", "--classifier-steps", "30",
                                  "--gan-train-per-class", "5", "--gan-train-arch", "convnet:width=8",
                                  "--gan-train-epochs", "3", "--grid", str(tmp_path / "g.png"),
                                  "--json", str(tmp_path / "q.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "real (ceiling)" in r.output and "coverage" in r.output and (tmp_path / "g.png").is_file()
    rep = json.loads((tmp_path / "q.json").read_text())
    assert set(rep["generators"]["digits"]) >= {"fidelity", "coverage", "fd", "gan_train"}
    assert 0 <= rep["real"]["coverage"] <= 1


# --- exact resume ----------------------------------------------------------------------------------------------------
def _tiny(data):
    gc = BuiltinConfig(img_resolution=16, img_channels=1, c_dim=10, z_dim=8, w_dim=16, embed_dim=8, channel_base=64,
                       channel_max=8, dataset="digits")
    tc = TrainConfig(steps=6, batch_size=8, d_channels=8, save_every=2, mbstd_group=4, r1_gamma=1.0, r1_every=2,
                     balanced=True, augment="color,translation,cutout")
    return gc, tc


def test_pretrain_killed_and_resumed_writes_the_same_checkpoint(tmp_path):
    data = load_dataset("digits", resize=16)
    idx = public_split_indices(len(data.y_train), 0.2, 0)
    gc, tc = _tiny(data)
    train_generator(data, idx, gc, tc, out=tmp_path / "a.safetensors", progress=False)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 5:  # after the checkpoint of step 4, in the middle of the next interval
            raise Killed

    with pytest.raises(Killed):
        train_generator(data, idx, gc, _tiny(data)[1], out=tmp_path / "b.safetensors", progress=False, on_step=kill)
    res = train_generator(data, idx, gc, _tiny(data)[1], out=tmp_path / "b.safetensors", progress=False,
                          resume=tmp_path / "b.train.safetensors")
    assert res.steps_done == 6
    for suffix in ("", ".train"):
        a, b = load_file(tmp_path / f"a{suffix}.safetensors"), load_file(tmp_path / f"b{suffix}.safetensors")
        assert a.keys() == b.keys() and len(a) > 10
        assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_cli_resume_and_its_errors(tmp_path, monkeypatch):
    from fedlatent.cli import main

    monkeypatch.setenv("FEDLATENT_PRETRAINED", str(tmp_path))
    out = tmp_path / "d.safetensors"
    base = ["pretrain", "--dataset", "digits", "--batch-size", "4", "--channel-base", "32", "--channel-max", "8",
            "--z-dim", "8", "--w-dim", "16", "--d-channels", "8", "--save-every", "1", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, base + ["--steps", "2"])
    assert r.exit_code == 0, r.output
    state = tmp_path / "d.train.safetensors"
    r = CliRunner().invoke(main, ["pretrain", "--resume", str(state), "--steps", "3", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "MANIFEST.json").read_text())["models"]["d"]
    assert entry["steps"] == 3 and "--steps 3" in entry["command"] and "--resume" not in entry["command"]
    assert "--save-every 1" in entry["command"]  # not given on resume: the recorded value, not the default
    r = CliRunner().invoke(main, ["pretrain", "--resume", str(state), "--steps", "4", "--lr-g", "0.1", "--out",
                                  str(out)])
    assert r.exit_code == 2 and "--lr-g" in r.output
    r = CliRunner().invoke(main, ["pretrain", "--resume", str(out), "--out", str(out)])
    assert r.exit_code == 2 and "training checkpoint" in r.output


# --- the random prior ------------------------------------------------------------------------------------------------
def test_random_generator_specs():
    assert parse_random_spec("digits") is None and parse_random_spec("random") == {}
    spec = complete_generator_spec("random:width=8,seed=3", 1, 16, 10)
    assert spec.startswith("random:res=16,channels=1,classes=10,width=8") and "seed=3" in spec
    g1, g2, g3 = load_generator(spec), load_generator(spec), load_generator(spec.replace("seed=3", "seed=4"))
    z, c = torch.randn(2, g1.z_dim), torch.tensor([0, 9])
    torch.testing.assert_close(g1.generate(z, c), g2.generate(z, c))  # seeded
    assert not torch.allclose(g1.generate(z, c), g3.generate(z, c))
    assert g1.img_resolution == 16 and g1.c_dim == 10
    with pytest.raises(FedLatentError, match="needs res="):
        load_generator("random:width=8")
    with pytest.raises(FedLatentError, match="bad random generator option"):
        parse_random_spec("random:depth=3")


def test_random_prior_end_to_end_in_distill(tmp_path):
    from fedlatent.cli import main

    args = ["distill", "--out", str(tmp_path / "r"), "--no-progress", "--clients", "2", "--rounds", "1",
            "--local-epochs", "1", "--ipc", "1", "--iterations", "1", "--syn-steps", "2", "--train-epochs", "1",
            "--surrogate", "convnet:width=8", "--model", "convnet:width=8", "--looped", "-O", "batch_size=64",
            "--generator", "random:width=8,seed=1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["generator_public_split"] is None  # an untrained generator saw no data: nothing to exclude
    from fedlatent.export import load_distilled

    ds, meta = load_distilled(tmp_path / "r" / "distilled.safetensors")
    assert meta["generator"].startswith("random:res=16,channels=1,classes=10,width=8") and len(ds) == 20


# --- new domains: npz folders with any number of classes ---------------------------------------------------------------
def _npz_folder(path, classes=100, per_class=3, res=8, channels=3):
    rng = np.random.default_rng(0)
    path.mkdir()
    for split, n in (("train", per_class), ("test", 1)):
        y = np.repeat(np.arange(classes), n).astype(np.int64)
        x = (rng.random((len(y), res, res, channels)) * 60 + (y[:, None, None, None] % 7) * 25).astype(np.uint8)
        np.savez(path / f"{split}.npz", x=x, y=y)
    return path


def test_pretrain_on_an_npz_folder_with_100_classes(tmp_path, monkeypatch):
    from fedlatent.cli import main

    folder = _npz_folder(tmp_path / "hundred")
    monkeypatch.setenv("FEDLATENT_PRETRAINED", str(tmp_path / "pre"))
    out = tmp_path / "hundred-generator.safetensors"
    r = CliRunner().invoke(main, ["pretrain", "--dataset", f"npz:{folder}", "--public-split", "0.5", "--steps", "2",
                                  "--batch-size", "8", "--channel-base", "32", "--channel-max", "8", "--z-dim", "8",
                                  "--w-dim", "16", "--d-channels", "8", "--out", str(out), "--no-manifest", "--quiet"])
    assert r.exit_code == 0, r.output
    g = load_generator(str(out))
    assert g.c_dim == 100 and g.img_resolution == 8 and g.sample(torch.tensor([0, 99])).shape == (2, 3, 8, 8)
    # a generator passed by path carries its public split: FedDGM keeps it away from the clients
    from fedlatent.fl.feddgm import private_training_data

    data = load_dataset(f"npz:{folder}")
    priv, info = private_training_data(data, str(out))
    assert info["excluded"] == 150 and len(priv.y_train) == 150


def test_no_generator_error_says_how_to_make_one(tmp_path):
    from fedlatent.cli import main

    folder = _npz_folder(tmp_path / "hundred", per_class=2)
    msg = no_generator_message(f"npz:{folder}")
    assert f"fedlatent pretrain --dataset npz:{folder}" in msg and "--generator random" in msg and "--space pixel" in msg
    r = CliRunner().invoke(main, ["distill", "--dataset", f"npz:{folder}", "--out", str(tmp_path / "x"),
                                  "--no-progress", "--clients", "2", "--rounds", "1"])
    assert r.exit_code == 2 and "fedlatent pretrain --dataset" in r.output and "--generator random" in r.output


def test_mode_seeking_loss_is_the_reciprocal_distance_ratio():
    """Mao et al. 2019 eq. 3 as minimised: 1 / (mean|x1 - x2| / mean|z1 - z2| + eps); more diverse pairs at the
    same latent distance cost less, and its gradient pushes the pair apart."""
    from fedlatent.generators.train import mode_seeking_loss

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ratio = (x1 - x2).abs().sum().item() / x1.numel() / ((z1 - z2).abs().sum().item() / z1.numel())
    assert mode_seeking_loss(x1, x2, z1, z2).item() == pytest.approx(1 / (ratio + 1e-5), rel=1e-6)
    assert mode_seeking_loss(x1, x1 + 2 * (x2 - x1), z1, z2) < mode_seeking_loss(x1, x2, z1, z2)
    a = x1.clone().requires_grad_(True)
    mode_seeking_loss(a, x2, z1, z2).backward()
    assert ((a.grad * (a - x2).detach()).sum() < 0)  # descending the loss moves x1 away from x2


def test_pretrain_with_mode_seeking_runs_resumes_and_changes_the_generator(tmp_path):
    """ms_weight > 0 trains (deterministically), differs from ms_weight 0, and is kept by --resume; negative is an
    error."""
    data = load_dataset("digits", resize=16)
    idx = public_split_indices(len(data.y_train), 0.2, 0)
    gc, tc = _tiny(data)
    z, c = torch.randn(3, gc.z_dim), F.one_hot(torch.tensor([0, 4, 9]), 10).float()
    outs = []
    for w in (0.0, 1.0, 1.0):
        tc = _tiny(data)[1]
        tc.ms_weight = w
        res = train_generator(data, idx, gc, tc, out=tmp_path / f"g{len(outs)}.safetensors", progress=False)
        outs.append(res.generator(z, c))
    assert torch.equal(outs[1], outs[2]) and not torch.allclose(outs[0], outs[1])
    saved, _ = read_train_state(tmp_path / "g1.train.safetensors")
    assert saved["train_config"]["ms_weight"] == 1.0
    tc = _tiny(data)[1]
    tc.ms_weight = -1.0
    with pytest.raises(FedLatentError, match="ms_weight"):
        train_generator(data, idx, gc, tc, out=tmp_path / "bad.safetensors", progress=False)
