"""fedlatent: federated learning on heterogeneous data through server-side dataset distillation."""
__version__ = "0.1.0"
