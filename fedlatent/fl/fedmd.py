"""Old path of :mod:`fedlatent.fl.methods.fedmd` (kept for one release)."""
from .._compat import alias_module

alias_module(__name__, ["fedlatent.fl.methods.fedmd"])
