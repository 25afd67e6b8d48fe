"""The StyleGAN-XL loader, tested offline against a look-alike generator pickled by the test itself.

The test writes a stand-in for the third_party/stylegan-xl checkout into a tmp folder: tiny ``dnnlib`` and
``torch_utils`` packages (a minimal "persistent class" mechanism that embeds module source in the pickle, like
StyleGAN's), a network module with StyleGAN-XL's attribute structure (mapping, synthesis.input,
synthesis.layer_names, per-layer modules, output_scale) and a discriminator module. After pickling, the
discriminator module is replaced by one that fails on import (as it would without timm), and every fake
module is dropped from ``sys.modules``, so loading takes the real code path: our unpickler, the fake
``torch_utils.persistence`` found through the code folder, source executed from the pickle.
"""
from __future__ import annotations

import copy
import pickle
import sys
import textwrap
import types
import warnings

import pytest
import torch

from fedlatent.data import normalize
from fedlatent.generators import LatentSet
from fedlatent.generators.stylegan_xl import _configure_ops, load_stylegan_xl, stylegan_xl_code
from fedlatent.utils import FedLatentError, sha256_file

FAKE_FILES = {
    "dnnlib/__init__.py": """
        class EasyDict(dict):
            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name)
            def __setattr__(self, name, value):
                self[name] = value
    """,
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": """
        import sys, types, uuid, inspect, copy
        import dnnlib
        _src_modules, _module_src = {}, {}

        def _module_for(src):
            if src not in _src_modules:
                name = "_imported_module_" + uuid.uuid4().hex
                mod = types.ModuleType(name)
                sys.modules[name] = mod
                _module_src[name] = src
                exec(compile(src, name, "exec"), mod.__dict__)
                _src_modules[src] = mod
            return _src_modules[src]

        def persistent_class(cls):
            if getattr(cls, "_is_persistent", False):
                return cls
            src = _module_src.get(cls.__module__) or inspect.getsource(sys.modules[cls.__module__])
            class Persistent(cls):
                _src, _cls_name, _is_persistent = src, cls.__name__, True
                def __reduce__(self):
                    fn, args, state = super().__reduce__()[:3]
                    meta = dict(module_src=self._src, class_name=self._cls_name, state=state)
                    return (_reconstruct_persistent_obj, (meta,), None)
            Persistent.__name__ = cls.__name__
            return Persistent

        def _reconstruct_persistent_obj(meta):
            meta = dnnlib.EasyDict(meta)
            cls = persistent_class(_module_for(meta.module_src).__dict__[meta.class_name])
            obj = cls.__new__(cls)
            obj.__setstate__(dict(meta.state))
            return obj
    """,
    "torch_utils/ops/__init__.py": "",
    "torch_utils/ops/bias_act.py": """
        import torch
        _plugin = None
        def _init():
            raise RuntimeError("no CUDA toolkit in this test")
        def bias_act(x, b, impl="cuda"):
            if impl == "cuda" and x.device.type == "cuda" and _init():
                raise RuntimeError("unreachable in tests")
            return torch.nn.functional.leaky_relu(x + b.view(1, -1, *([1] * (x.ndim - 2))), 0.2)
    """,
    "training/__init__.py": "",
    "training/networks_lookalike.py": """
        import math
        import torch
        import torch.nn.functional as F
        from torch_utils import persistence
        from torch_utils.ops import bias_act

        @persistence.persistent_class
        class FC(torch.nn.Module):
            def __init__(self, i, o, act=True):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.randn(o, i) / math.sqrt(i))
                self.bias = torch.nn.Parameter(torch.randn(o) * 0.1)
                self.act = act
            def forward(self, x):
                x = x @ self.weight.t()
                return bias_act.bias_act(x, self.bias) if self.act else x + self.bias

        @persistence.persistent_class
        class MappingNetwork(torch.nn.Module):
            def __init__(self, z_dim, c_dim, w_dim, num_ws):
                super().__init__()
                self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
                self.embed = torch.nn.Embedding(c_dim, z_dim)
                self.fc0 = FC(2 * z_dim, w_dim)
                self.fc1 = FC(w_dim, w_dim)
            def forward(self, z, c, truncation_psi=1.0):
                y = self.embed(c.argmax(1))
                x = torch.cat([z, y], 1)
                x = self.fc1(self.fc0(x))
                return x.unsqueeze(1).repeat([1, self.num_ws, 1])

        @persistence.persistent_class
        class SynthesisInput(torch.nn.Module):
            def __init__(self, w_dim, channels, size):
                super().__init__()
                self.size = size
                self.affine = FC(w_dim, 4, act=False)
                self.register_buffer("freqs", torch.randn(channels, 2))
                self.register_buffer("phases", torch.rand(channels))
            def forward(self, w):
                t = self.affine(w)
                g = torch.linspace(-1, 1, self.size, dtype=w.dtype, device=w.device)
                gy, gx = torch.meshgrid(g, g, indexing="ij")
                grid = torch.stack([gx, gy], -1)  # [s, s, 2]
                arg = grid @ self.freqs.t().to(w.dtype)  # [s, s, C]
                x = torch.sin(arg[None] * t[:, None, None, :1] + self.phases + t[:, None, None, 1:2])
                return x.permute(0, 3, 1, 2).contiguous()

        @persistence.persistent_class
        class SynthesisLayer(torch.nn.Module):
            def __init__(self, w_dim, cin, cout, up=False, torgb=False):
                super().__init__()
                self.affine = FC(w_dim, cin, act=False)
                self.weight = torch.nn.Parameter(torch.randn(cout, cin, 3, 3) / math.sqrt(9 * cin))
                self.bias = torch.nn.Parameter(torch.zeros(cout))
                self.up, self.torgb = up, torgb
            def forward(self, x, w, noise_mode="random", force_fp32=False):
                s = self.affine(w) + 1
                if self.up:
                    x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = F.conv2d(x * s[:, :, None, None], self.weight, padding=1)
                return x + self.bias.view(1, -1, 1, 1) if self.torgb else bias_act.bias_act(x, self.bias)

        @persistence.persistent_class
        class SynthesisNetwork(torch.nn.Module):
            def __init__(self, w_dim, img_resolution, img_channels):
                super().__init__()
                self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
                self.output_scale = 0.25
                self.input = SynthesisInput(w_dim, 6, img_resolution // 2)
                specs = [(6, 8, False), (8, 8, True), (8, 5, False), (5, img_channels, False)]
                self.layer_names = []
                for i, (ci, co, up) in enumerate(specs):
                    name = f"L{i}_{co}"
                    setattr(self, name, SynthesisLayer(w_dim, ci, co, up=up, torgb=i == len(specs) - 1))
                    self.layer_names.append(name)
                self.num_ws = len(self.layer_names) + 1
            def forward(self, ws, **kw):
                ws = ws.unbind(dim=1)
                x = self.input(ws[0])
                for name, w in zip(self.layer_names, ws[1:]):
                    x = getattr(self, name)(x, w, **kw)
                return x * self.output_scale

        @persistence.persistent_class
        class Generator(torch.nn.Module):
            def __init__(self, z_dim=8, c_dim=3, w_dim=12, img_resolution=8, img_channels=3):
                super().__init__()
                self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
                self.img_resolution, self.img_channels = img_resolution, img_channels
                self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels)
                self.num_ws = self.synthesis.num_ws
                self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws)
            def forward(self, z, c, **kw):
                return self.synthesis(self.mapping(z, c), **kw)
    """,
    "pg_modules/__init__.py": "",
    "pg_modules/discriminator.py": """
        import torch
        class ProjectedDiscriminator(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.head = torch.nn.Linear(4, 1)
                self.fn = print
    """,
}
TRAP = 'raise ImportError("No module named \'timm\' (the loader must never import the discriminator)")\n'


def _write_code(root):
    for rel, src in FAKE_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))


def _forget(root):
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if f.startswith(str(root)) or name.startswith("_imported_module_"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory):
    """(code_dir, pickle_path): a fake submodule checkout and a network pickle made with it."""
    root = tmp_path_factory.mktemp("sgxl")
    code = root / "stylegan-xl"
    _write_code(code)
    sys.path.insert(0, str(code))
    try:
        from pg_modules.discriminator import ProjectedDiscriminator
        from training.networks_lookalike import Generator

        import dnnlib

        torch.manual_seed(0)
        G = Generator()
        data = {"G": G, "G_ema": copy.deepcopy(G), "D": ProjectedDiscriminator(), "augment_pipe": None,
                "training_set_kwargs": dnnlib.EasyDict(resolution=8)}
        pkl = root / "network.pkl"
        with open(pkl, "wb") as f:
            pickle.dump(data, f)
    finally:
        sys.path.remove(str(code))
        _forget(code)
    (code / "pg_modules" / "discriminator.py").write_text(TRAP)
    return code, pkl


def load(lookalike, **kw):
    code, pkl = lookalike
    return load_stylegan_xl(pkl, code_dir=code, **kw)


def test_load_skips_discriminator_and_cleans_up(lookalike):
    code, _ = lookalike
    path_before, mods_before = list(sys.path), set(sys.modules)
    gen = load(lookalike)
    assert sys.path == path_before
    assert not any(m.startswith(("dnnlib", "torch_utils", "training", "pg_modules", "_imported_module_"))
                   for m in set(sys.modules) - mods_before)
    assert (gen.z_dim, gen.c_dim, gen.w_dim, gen.num_ws, gen.num_layers) == (8, 3, 12, 5, 4)
    assert (gen.img_channels, gen.img_resolution) == (3, 8)
    assert not any(p.requires_grad for p in gen.module.parameters())
    img = gen.generate(torch.randn(2, 8), torch.tensor([0, 2]))  # works after its modules left sys.modules
    assert img.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 4])
def test_lookalike_identity_every_space(lookalike, k):
    """Rendering from (ws, f_k) obtained from (z, c) == the network's own forward pass (float64)."""
    gen = load(lookalike)
    gen.module.double()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    ls = LatentSet.initialize(gen, k, ipc=2, seed=3, clip=None, mean=mean, std=std, chunk_size=4)
    onehot = torch.nn.functional.one_hot(ls.labels, 3).double()
    direct = gen.module(ls.z_init, onehot)  # the look-alike's own Generator.forward (incl. output_scale)
    want = normalize((direct + 1) / 2, mean, std)
    torch.testing.assert_close(ls.render(), want, rtol=0, atol=1e-12)
    if k >= 0:
        assert ls.ws.shape == (6, gen.num_ws - 1 - k, gen.w_dim)


def test_wrong_sha256_is_one_line_error(lookalike):
    code, pkl = lookalike
    with pytest.raises(FedLatentError, match="sha256 mismatch") as e:
        load_stylegan_xl(pkl, code_dir=code, expected_sha256="0" * 64)
    assert "\n" not in str(e.value)
    gen = load_stylegan_xl(pkl, code_dir=code, expected_sha256=sha256_file(pkl))
    assert gen.num_layers == 4


def test_truncated_pickle_is_one_line_error(lookalike, tmp_path):
    code, pkl = lookalike
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    with pytest.raises(FedLatentError, match="truncated or corrupt") as e:
        load_stylegan_xl(bad, code_dir=code)
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle at all")
    with pytest.raises(FedLatentError, match="truncated or corrupt"):
        load_stylegan_xl(junk, code_dir=code)


def test_pickle_without_g_ema(lookalike, tmp_path):
    code, _ = lookalike
    p = tmp_path / "other.pkl"
    p.write_bytes(pickle.dumps({"G": 1}))
    with pytest.raises(FedLatentError, match="no 'G_ema'"):
        load_stylegan_xl(p, code_dir=code)


def test_missing_submodule_error(lookalike, tmp_path):
    _, pkl = lookalike
    empty = tmp_path / "stylegan-xl"
    empty.mkdir()
    with pytest.raises(FedLatentError, match="git submodule update --init third_party/stylegan-xl") as e:
        load_stylegan_xl(pkl, code_dir=empty)
    assert "\n" not in str(e.value)


def test_missing_file_error(lookalike, tmp_path):
    code, _ = lookalike
    with pytest.raises(FedLatentError, match="does not exist"):
        load_stylegan_xl(tmp_path / "nope.pkl", code_dir=code)


def test_unknown_latent_space(lookalike):
    gen = load(lookalike)
    with pytest.raises(FedLatentError, match="unknown latent space F5") as e:
        LatentSet.initialize(gen, "F5", ipc=1)
    assert "\n" not in str(e.value)
    with pytest.raises(FedLatentError, match="unknown latent space"):
        LatentSet.initialize(gen, "Z3", ipc=1)


def test_code_path_context_restores(lookalike):
    code, _ = lookalike
    before = list(sys.path)
    with stylegan_xl_code(code):
        import dnnlib  # noqa: F401  (importable only inside)

        assert str(code.resolve()) == sys.path[0]
    assert sys.path == before and "dnnlib" not in sys.modules


def test_custom_ops_selection(monkeypatch):
    """CUDA device: a failed plugin build falls back to the reference path ('auto') or is an error (True)."""
    mod = types.ModuleType("torch_utils.ops.bias_act")

    def failing_init():
        raise RuntimeError("nvcc not found")

    mod._init = failing_init
    monkeypatch.setitem(sys.modules, "torch_utils.ops.bias_act", mod)
    with pytest.raises(FedLatentError, match="could not build StyleGAN-XL CUDA op bias_act"):
        _configure_ops(torch.device("cuda"), True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _configure_ops(torch.device("cuda"), "auto")
    assert mod._init() is False and any("reference implementation" in str(x.message) for x in w)
    mod._init = failing_init
    _configure_ops(torch.device("cpu"), "auto")  # CPU: ops pick the reference path themselves
    assert mod._init is failing_init
    _configure_ops(torch.device("cpu"), False)
    assert mod._init() is False
