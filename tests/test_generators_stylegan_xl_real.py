"""The loader and the F_k adapter against StyleGAN-XL's REAL code (a tiny randomly initialised generator).

Runs only where the StyleGAN-XL code is available: the ``third_party/stylegan-xl`` submodule checked out
(``git submodule update --init third_party/stylegan-xl``) or ``$FEDLATENT_STYLEGAN_XL`` pointing at a checkout;
it also needs ``requests`` (imported by StyleGAN's ``dnnlib``). Otherwise it is skipped.

A tiny ``training.networks_stylegan3_resetting.Generator`` (the network StyleGAN-XL's pickles hold) is built
with the real code, pickled the way StyleGAN-XL's training loop does (a dict with G / D / G_ema), and loaded
through :func:`fedlatent.generators.stylegan_xl.load_stylegan_xl`; then every F_k and W+ must reproduce the
real ``G.synthesis`` exactly.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import sys

import pytest
import torch

from fedlatent.generators import LatentSet
from fedlatent.generators.stylegan_xl import check_code_dir, load_stylegan_xl, stylegan_xl_code
from fedlatent.utils import FedLatentError


def _code_dir():
    try:
        return check_code_dir()
    except FedLatentError:
        return None


CODE = _code_dir()
pytestmark = [
    pytest.mark.skipif(CODE is None, reason="StyleGAN-XL code not checked out (third_party/stylegan-xl)"),
    pytest.mark.skipif(importlib.util.find_spec("requests") is None, reason="StyleGAN-XL's dnnlib needs requests"),
]


@pytest.fixture(scope="module")
def real_pickle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sgxl-real")
    path = tmp / "tiny.pkl"
    # MappingNetwork.__init__ reads in_embeddings/tf_efficientnet_lite0.pkl relative to the working directory; the
    # shipped file needs dill, so the test provides a plain-pickle class embedding of its own there.
    (tmp / "in_embeddings").mkdir()
    torch.manual_seed(1)
    with open(tmp / "in_embeddings" / "tf_efficientnet_lite0.pkl", "wb") as f:
        pickle.dump({"embed": torch.nn.Embedding(1000, 24)}, f)
    cwd = os.getcwd()
    with stylegan_xl_code(CODE):
        os.chdir(tmp)
        try:
            from training.networks_stylegan3_resetting import Generator

            torch.manual_seed(0)
            G = Generator(z_dim=16, c_dim=10, w_dim=16, img_resolution=16, img_channels=3,
                          channel_base=256, channel_max=16, num_layers=4, num_critical=2, margin_size=4,
                          num_fp16_res=0, conv_kernel=3, use_radial_filters=False).eval()
            with torch.no_grad():  # untrained magnitude EMAs are 1; fine, but give the biases some values
                for name, p in G.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.1)
        finally:
            os.chdir(cwd)
        with open(path, "wb") as f:
            pickle.dump({"G": G, "D": None, "G_ema": copy.deepcopy(G), "training_set_kwargs": None}, f)
    return path


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 4, 5])
def test_real_stylegan_xl_every_space(real_pickle, k):
    before = list(sys.path)
    gen = load_stylegan_xl(real_pickle, code_dir=CODE)
    assert sys.path == before and "dnnlib" not in sys.modules and "torch_utils" not in sys.modules
    assert gen.num_layers == 5 and gen.num_ws == 6 and gen.c_dim == 10
    ls = LatentSet.initialize(gen, k, ipc=1, seed=0, clip=None, mean=(0.5,) * 3, std=(0.5,) * 3, chunk_size=4)
    onehot = torch.nn.functional.one_hot(ls.labels, 10).float()
    with torch.no_grad():
        direct = gen.module.synthesis(gen.module.mapping(ls.z_init, onehot))  # the real StyleGAN-XL forward
    want = direct  # (x+1)/2 normalised with mean = std = 0.5 is the identity
    torch.testing.assert_close(ls.render(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    ls.backward(g)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ls.parameters())
