"""Old path of :mod:`fedlatent.fl.methods.dynafed` (kept for one release)."""
from .._compat import alias_module

alias_module(__name__, ["fedlatent.fl.methods.dynafed", "fedlatent.distill.global_trajectory", "fedlatent.distill.samplers",
                        "fedlatent.artifacts.pseudo", "fedlatent.artifacts.grids"])
