"""Old path of FedDGM (kept for one release): the method is :mod:`fedlatent.fl.methods.feddgm`, the batched
multi-client engine :mod:`fedlatent.distill.batched`, the run driver :mod:`fedlatent.apps.distill`, generator
lookup :mod:`fedlatent.generators.resolve`, grids and reports :mod:`fedlatent.artifacts`."""
from .._compat import alias_module
from ..errors import is_diverged

alias_module(__name__, ["fedlatent.fl.methods.feddgm", "fedlatent.distill.batched", "fedlatent.apps.distill",
                        "fedlatent.generators.resolve", "fedlatent.artifacts.grids", "fedlatent.artifacts.report",
                        "fedlatent.artifacts"], extra={"diverged": is_diverged})
