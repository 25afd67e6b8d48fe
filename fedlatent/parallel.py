"""Old path of the Ray backend, :mod:`fedlatent.backends.ray` (kept for one release)."""
from ._compat import alias_module

alias_module(__name__, ["fedlatent.backends.ray", "fedlatent.backends", "fedlatent.backends.serial"])
