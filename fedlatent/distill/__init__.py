"""Dataset distillation by trajectory matching (MTT) and its building blocks.

* :mod:`.augment` -- differentiable siamese augmentation (replayable) and ZCA whitening;
* :mod:`.kernels` -- per-step gradient and R-operator (autograd, hand-written ConvNet);
* :mod:`.mtt` -- plans, the student step, the trajectory loss, exact/unrolled meta-gradients;
* :mod:`.distiller` -- the optimisation loop over any SyntheticSet and expert segments (``compute`` + ``apply``);
* :mod:`.batched` -- several clients' iterations, looped or as one batched computation, with a memory budget;
* :mod:`.samplers` -- expert-trajectory segments (MTT, DynaFed);
* :mod:`.pool` -- per-client distilled sets pooled with provenance (FedDGM's server side);
* :mod:`.global_trajectory` -- DynaFed's synthesis of a soft-labelled pseudo set from the global trajectory;
* :mod:`.experts` -- expert trajectories (train, save, load);
* :mod:`.pixels` -- pixel-space distillation and evaluation, and the ``fedlatent distill-pixels`` pipeline.
"""
from .augment import DSA, ZCA, DSAParams
from .distiller import DistillConfig, Distiller, TrajectorySampler
from .experts import load_experts, save_experts, train_experts
from .mtt import MetaGrad, StepPlan, make_plan, meta_gradient, student_step, trajectory_loss, tune_allocator
from .pixels import distill_pixels, evaluate_synthetic, init_synthetic

__all__ = [
    "DSA", "ZCA", "DSAParams", "DistillConfig", "Distiller", "TrajectorySampler", "load_experts", "save_experts",
    "train_experts", "MetaGrad", "StepPlan", "make_plan", "meta_gradient", "student_step", "trajectory_loss",
    "tune_allocator", "distill_pixels", "evaluate_synthetic", "init_synthetic",
]
