"""Old path of :mod:`fedlatent.fl.methods.fedavg` (kept for one release)."""
from .._compat import alias_module

alias_module(__name__, ["fedlatent.fl.methods.fedavg"])
