"""Old import paths kept for one release: a module at the old path that forwards to the new modules.

``alias_module(__name__, [new modules])`` replaces the old module in ``sys.modules`` by one that looks every
name up in the new modules (in order) and forwards an assignment to the new module that defines the name, so
``monkeypatch.setattr(old_module, "f", g)`` still reaches the code that calls ``f`` (and deleting the name
again - how a patch is undone - gives the new module its own ``f`` back).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Mapping, Sequence


class _Forwarding(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        for target in self.__dict__["_fedlatent_targets"]:
            mod = importlib.import_module(target)
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("__"):
            saved = self.__dict__["_fedlatent_saved"]
            for target in self.__dict__["_fedlatent_targets"]:
                mod = importlib.import_module(target)
                if name in vars(mod):
                    saved.setdefault((target, name), vars(mod)[name])
                    setattr(mod, name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        # undoing a patch (pytest's monkeypatch deletes what it set here): the new modules get their own back
        saved = self.__dict__["_fedlatent_saved"]
        for (target, n) in [k for k in saved if k[1] == name]:
            setattr(importlib.import_module(target), n, saved.pop((target, n)))
        if name in self.__dict__:
            super().__delattr__(name)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        for target in self.__dict__["_fedlatent_targets"]:
            names |= set(dir(importlib.import_module(target)))
        return sorted(names)


def alias_module(name: str, targets: Sequence[str], extra: Mapping[str, Any] | None = None) -> None:
    """Make the module ``name`` (already in ``sys.modules``) forward to ``targets``; ``extra``: old names."""
    mod = sys.modules[name]
    mod.__dict__["_fedlatent_targets"] = tuple(targets)
    mod.__dict__["_fedlatent_saved"] = {}
    for k, v in (extra or {}).items():
        mod.__dict__[k] = v
    mod.__class__ = _Forwarding
