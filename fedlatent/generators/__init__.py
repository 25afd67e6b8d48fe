"""Generators and their latent spaces (GLaD-style distillation through a generator prior).

* :mod:`.base`: the :class:`Generator` interface (StyleGAN-XL's layered synthesis) and :class:`LayeredGenerator`;
* :mod:`.latent`: :class:`LatentSet`, a synthetic set parameterised in F_k / W+ / pixel space;
* :mod:`.builtin`: fedlatent's compact class-conditional style generator (safetensors checkpoints);
* :mod:`.train`: ``fedlatent pretrain`` (GAN training of the built-in generator on a public split);
* :mod:`.stylegan_xl`: loader for official StyleGAN-XL pickles (code from the third_party/stylegan-xl submodule);
* :mod:`.registry`: ``pretrained/MANIFEST.json``, downloads and :func:`load_generator`.
"""
from .base import Generator, LayeredGenerator
from .builtin import BuiltinConfig, BuiltinStyleGenerator, as_generator, load_builtin, save_builtin
from .latent import LatentSet, parse_space, space_name
from .registry import fetch, load_generator, read_manifest

__all__ = [
    "Generator", "LayeredGenerator", "BuiltinConfig", "BuiltinStyleGenerator", "as_generator", "load_builtin",
    "save_builtin", "LatentSet", "parse_space", "space_name", "load_generator", "fetch", "read_manifest",
]
