"""fedlatent: federated learning on heterogeneous data through server-side dataset distillation."""
__version__ = "0.1.0"

# Lazy re-exports (importing fedlatent stays cheap; torch loads on first use).
_LAZY = {
    "load_distilled": ("fedlatent.export", "load_distilled"),
    "save_distilled": ("fedlatent.export", "save_distilled"),
    "distill_federated": ("fedlatent.apps.distill", "distill_federated"),
    "evaluate_distilled": ("fedlatent.evaluate", "evaluate_distilled"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fedlatent' has no attribute {name!r}")
