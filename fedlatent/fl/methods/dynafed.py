"""DynaFed (Pi et al., "DynaFed: Tackling Client Data Heterogeneity with Global Dynamics", CVPR 2023).

FedAvg, plus a server that distils the *global* training dynamics into a small pseudo data set and
uses it to correct every later aggregate (ALGORITHMS.md §3; reference pipilurj/DynaFed):

1. **Trajectory buffer.** The server keeps the global weights ``w_0`` (initialisation) and the
   FedAvg aggregate ``w_r`` of every round r as flat vectors, until it synthesises.
2. **Synthesis (once, at round L = ``synth_round``).** Trajectory matching (MTT, Cazenavette et
   al. 2022; :mod:`fedlatent.distill.mtt`) against segments of the global trajectory. Each
   iteration draws a start ``s`` uniformly in ``[min_start, min(max_start, L - expert_epochs)]``
   and a target ``w*``: either ``w_{s+E}`` (E = ``expert_epochs``), or - DynaFed's weight
   averaging - the mean of ``k`` distinct snapshots of ``w_{s+1} .. w_{s+E}`` with ``k`` uniform in
   ``[least_ave_num, min(max_ave_num, E)]`` (:func:`sample_segment`, :func:`segment_target`).
   A student starts at ``w_s`` and takes ``syn_steps`` SGD steps on the pseudo set (MTT eq. 1,
   DSA-augmented); the pseudo images ``X`` (initialised from N(0, 1) in the normalised input
   space), the soft-label logits ``Y`` (initialised ``label_init * onehot``) and the student step
   size (initialised ``lr_teacher``) are updated with Adam to minimise MTT eq. 2,
   ``||theta_N - w*||^2 / ||w_s - w*||^2``. The loop is the MTT engine's
   :class:`fedlatent.distill.distiller.Distiller` (meta-gradients from
   :func:`fedlatent.distill.mtt.meta_gradient`, soft labels as logits) fed by
   :class:`GlobalTrajectorySampler`.
3. **Server fine-tuning.** From round L on, after every aggregation, the global model is trained
   on the pseudo set for ``finetune_epochs`` epochs of Adam (``finetune_lr``, ``finetune_batch``,
   DSA) with the soft-label loss ``-sum_k softmax(Y)_k log softmax(f(x))_k``
   (:func:`finetune_on_pseudo`).

Units. The reference's ``kd_loss`` averages over the classes as well as the batch, i.e. it is the
soft cross-entropy divided by K; its ``lr_teacher`` is a step size on that loss. ``lr_teacher``
keeps the reference's meaning: the student's SGD step on the cross-entropy (the loss of
:mod:`fedlatent.distill.mtt`) is ``lr_teacher / K``. The learnable step size (``syn_lr``) lives in
the same units and is updated by Adam with ``lr_lr`` as in the reference. Adam makes the server
fine-tuning insensitive to that constant factor.

Artefacts in the run folder (when the simulation writes one): ``pseudo.safetensors`` (images,
label_logits, soft_labels, lr, synthesis_loss; metadata: mean/std, ipc, synth round, seed, ...),
``pseudo.png`` (the de-normalised images, one row per class by argmax of the soft label) and
``synthesis_loss.png``. A non-finite loss or gradient stops the synthesis with a logged message;
the last good pseudo set (the one before the failing update) is kept and saved.

Differences from the reference, on purpose: the snapshots averaged into a target are distinct
(the reference draws them with replacement); the trajectory is recorded up to the synthesis only
(the reference starts a new, unused list afterwards); BatchNorm statistics are not re-estimated on
the pseudo set before fine-tuning (the default ConvNet uses instance norm).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...artifacts import PSEUDO_FILE, PSEUDO_GRID_FILE as GRID_FILE, SYNTHESIS_LOSS_FILE as LOSS_FILE
from ...artifacts.grids import save_pseudo_grid
from ...artifacts.pseudo import PseudoSet, load_pseudo_set, save_pseudo_set  # noqa: F401 - re-exported
from ...distill.augment import parse_strategy
from ...distill.global_trajectory import (SynthesisConfig, SynthesisResult, finetune_on_pseudo,  # noqa: F401
                                          init_pseudo_set, make_augment, synthesize)
from ...distill.samplers import GlobalTrajectorySampler, sample_segment, segment_target  # noqa: F401 - re-exported
from ...distill.samplers import SegmentIndex as Segment  # noqa: F401 - re-exported
from ...errors import FedLatentError
from ...models.functional import FlatModel
from ...utils import torch_generator
from ..base import FLContext, Upload, register_method
from ..options import make_config
from .fedavg import FedAvg

log = logging.getLogger("fedlatent.fl.dynafed")



# ---------------------------------------------------------------------------------------------
# The strategy


_SYNTH = SynthesisConfig()  # the engine's defaults, the one place they are written


@dataclass
class DynaFedConfig:
    """Options of :class:`DynaFed`. Defaults are scaled for a CPU (tuned on Fashion-MNIST, alpha 0.01, 20 clients,
    ConvNet width 16, local momentum SGD); each field gives the paper / reference (pipilurj/DynaFed) value. The
    synthesis fields take their defaults from the engine's
    :class:`~fedlatent.distill.global_trajectory.SynthesisConfig` (one set of defaults)."""

    synth_round: int = 20
    """Round L at which the pseudo set is synthesised, once [reference: when 25 snapshots exist, i.e. 24]."""
    ipc: int = _SYNTH.ipc
    """Pseudo images per class [15]."""
    iterations: int = _SYNTH.iterations
    """Trajectory-matching iterations of the synthesis [3000]."""
    syn_steps: int = _SYNTH.syn_steps
    """Student steps per iteration (MTT eq. 1) [20]."""
    expert_epochs: int = _SYNTH.expert_epochs
    """Rounds a matched segment spans [3]."""
    min_start: int = _SYNTH.min_start
    """Earliest segment start (snapshot index) [0]."""
    max_start: int = _SYNTH.max_start
    """Latest segment start [50]."""
    weight_averaging: bool = _SYNTH.weight_averaging
    """Target = mean of several snapshots of the segment (DynaFed's weight averaging) [True]."""
    least_ave_num: int = _SYNTH.least_ave_num
    """Fewest snapshots averaged into a target [2]."""
    max_ave_num: int = _SYNTH.max_ave_num
    """Most snapshots averaged into a target [10]."""
    lr_img: float = _SYNTH.lr_img
    """Adam step on the pseudo images [5e-2]."""
    lr_label: float = _SYNTH.lr_label
    """Adam step on the soft-label logits [1e-2]."""
    lr_lr: float = _SYNTH.lr_lr
    """Adam step on the learnable student lr [1e-5]."""
    lr_teacher: float = _SYNTH.lr_teacher
    """Initial student lr, class-mean KD units (module docstring) [0.04]: momentum-SGD clients move the global
    model much further per round than the reference's Adam(1e-3) clients; with 0.04 the student covers a sixth of
    a 3-round segment and the matching loss stays high."""
    label_init: float = _SYNTH.label_init
    """Soft-label logits start at label_init * onehot [0 in the experiment scripts, 10 as the argparse default]:
    from uniform labels a few hundred iterations leave them nearly uniform and collapsed onto a few classes."""
    batch_syn: int | None = _SYNTH.batch_syn
    """Pseudo images per student step (None: the whole set) [same]."""
    dsa: bool = _SYNTH.dsa
    """Differentiable siamese augmentation in the student steps [True]."""
    dsa_strategy: str = _SYNTH.dsa_strategy
    """DSA transformations [same]."""
    mtt_mode: str = _SYNTH.mtt_mode
    """Meta-gradient: 'exact' (constant memory) or 'unrolled' (same gradient, faster for small models, memory
    grows with syn_steps)."""
    finetune_epochs: int = 8
    """Server fine-tuning epochs on the pseudo set, every round from synth_round on [8 FMNIST / 20 CIFAR-10]."""
    finetune_lr: float = 1e-3
    """Adam lr of the fine-tuning [1e-4; at 1e-4 the server step is too small against momentum-SGD clients]."""
    finetune_batch: int = 256
    """Fine-tuning minibatch size [256]."""
    finetune_dsa: bool = True
    """DSA during fine-tuning [True]."""
    progress: bool = True
    """Show a progress bar during the synthesis."""
    save_artifacts: bool = True
    """Write pseudo.safetensors, pseudo.png and synthesis_loss.png into the run folder."""

    def __post_init__(self):
        def bad(msg: str) -> None:
            raise FedLatentError(f"dynafed: {msg}")

        ints = ("synth_round", "ipc", "iterations", "syn_steps", "expert_epochs", "min_start", "max_start",
                "least_ave_num", "max_ave_num", "finetune_epochs", "finetune_batch")
        for k in ints:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                bad(f"{k} must be an integer, got {v!r}")
        if self.expert_epochs < 1 or self.syn_steps < 1 or self.ipc < 1 or self.finetune_batch < 1:
            bad("expert_epochs, syn_steps, ipc and finetune_batch must be >= 1")
        if self.iterations < 0 or self.finetune_epochs < 0 or self.min_start < 0 or self.max_start < 0:
            bad("iterations, finetune_epochs, min_start and max_start must be >= 0")
        if self.synth_round < self.expert_epochs:
            bad(f"synth_round ({self.synth_round}) must be >= expert_epochs ({self.expert_epochs}): a segment spans "
                f"expert_epochs rounds of the global trajectory")
        if self.least_ave_num < 1 or self.max_ave_num < self.least_ave_num:
            bad("need 1 <= least_ave_num <= max_ave_num")
        for k in ("lr_img", "lr_label", "lr_lr", "finetune_lr"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(f"{k} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.lr_teacher, (int, float)) and math.isfinite(self.lr_teacher) and self.lr_teacher > 0):
            bad(f"lr_teacher must be > 0, got {self.lr_teacher!r}")
        if not (isinstance(self.label_init, (int, float)) and math.isfinite(self.label_init)):
            bad(f"label_init must be a finite number, got {self.label_init!r}")
        b = self.batch_syn
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            bad(f"batch_syn must be a positive integer or null, got {b!r}")
        if self.mtt_mode not in ("exact", "unrolled"):
            bad(f"mtt_mode must be 'exact' or 'unrolled', got {self.mtt_mode!r}")
        parse_strategy(str(self.dsa_strategy))
        for k in ints:
            setattr(self, k, int(getattr(self, k)))
        for k in ("lr_img", "lr_label", "lr_lr", "lr_teacher", "label_init", "finetune_lr"):
            setattr(self, k, float(getattr(self, k)))
        for k in ("weight_averaging", "dsa", "finetune_dsa", "progress", "save_artifacts"):
            setattr(self, k, bool(getattr(self, k)))
        self.batch_syn = None if b is None else int(b)
        self.dsa_strategy = str(self.dsa_strategy)

    def synthesis(self) -> "SynthesisConfig":
        """The synthesis part (what :func:`synthesize` takes)."""
        return SynthesisConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SynthesisConfig)})


@register_method("dynafed")
class DynaFed(FedAvg):
    """FedAvg + one-off trajectory-matching synthesis at round ``synth_round`` + server fine-tuning.

    Options: :class:`DynaFedConfig` (CPU-scaled defaults, the reference's value at each field).
    """

    config_class = DynaFedConfig

    def __init__(self, config: DynaFedConfig | None = None, **options):
        self.config = c = make_config(DynaFedConfig, config, options)
        self.synth = c.synthesis()
        self.synth_round = c.synth_round
        self.finetune_epochs, self.finetune_lr = c.finetune_epochs, c.finetune_lr
        self.finetune_batch, self.finetune_dsa = c.finetune_batch, c.finetune_dsa
        self.progress, self.save_artifacts = c.progress, c.save_artifacts
        self.trajectory: list[torch.Tensor] = []
        self.pseudo: PseudoSet | None = None
        self.synthesized_round: int | None = None
        self.synthesis_loss: list[float] = []
        self.synthesis_failure: str | None = None

    def options(self) -> dict[str, Any]:
        o = dict(vars(self.synth))
        o.update(synth_round=self.synth_round, finetune_epochs=self.finetune_epochs, finetune_lr=self.finetune_lr,
                 finetune_batch=self.finetune_batch, finetune_dsa=self.finetune_dsa)
        return o

    # -- engine hooks ------------------------------------------------------------------------------
    def setup(self, ctx: FLContext) -> None:
        super().setup(ctx)
        self._flat = FlatModel(self.model)
        self.trajectory = [self._flat.flatten().cpu()]
        self.pseudo, self.synthesized_round, self.synthesis_loss, self.synthesis_failure = None, None, [], None
        if ctx.config.rounds < self.synth_round:
            log.warning("DynaFed: synth_round %d is after the last round (%d): this run is plain FedAvg",
                        self.synth_round, ctx.config.rounds)
        run_dir = getattr(ctx, "run_dir", None)
        if run_dir and self.save_artifacts:  # a rerun with --overwrite must not show the old run's pseudo set
            for name in (PSEUDO_FILE, GRID_FILE, LOSS_FILE):
                (Path(run_dir) / name).unlink(missing_ok=True)

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        super().aggregate(rnd, uploads)
        extra: dict[str, float] = {}
        if self.synthesized_round is None:
            self.trajectory.append(self._flat.flatten().cpu())
            if rnd >= self.synth_round:
                extra.update(self._synthesize(rnd))
        if self.pseudo is not None and self.finetune_epochs > 0:
            t0 = time.perf_counter()
            loss = finetune_on_pseudo(
                self.model, self.pseudo, epochs=self.finetune_epochs, lr=self.finetune_lr,
                batch_size=self.finetune_batch, augment=make_augment(self.finetune_dsa, self.synth.dsa_strategy),
                generator=torch_generator(self.ctx.config.seed, "dynafed", "finetune", rnd))
            extra.update(finetune_loss=loss, finetune_s=time.perf_counter() - t0)
        return extra

    # -- synthesis -----------------------------------------------------------------------------------
    def _synthesize(self, rnd: int) -> dict[str, float]:
        ctx = self.ctx
        log.info("DynaFed: synthesising the pseudo set at round %d from %d global snapshots", rnd, len(self.trajectory))
        student = copy.deepcopy(self.model)
        res = synthesize(student, self.trajectory, ctx.num_classes, (ctx.channels, ctx.image_size, ctx.image_size),
                         self.synth, ctx.config.seed, device=ctx.device, progress=self.progress)
        self.synthesized_round = rnd
        self.synthesis_loss = res.losses
        self.synthesis_failure = res.failure
        self.pseudo = res.pseudo
        if res.pseudo is None:
            log.warning("DynaFed: no usable pseudo set (%s); continuing as FedAvg",
                        res.failure or "0 synthesis iterations")
        if self.save_artifacts and getattr(ctx, "run_dir", None):
            self.save(ctx.run_dir)
        tail = res.losses[-10:]
        return {"synth_loss": float(np.mean(tail)) if tail else math.nan, "synth_s": res.seconds,
                "synth_iterations": float(len(res.losses)), "syn_lr": res.pseudo.lr if res.pseudo else math.nan}

    def metadata(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"mean": list(ctx.mean) if ctx.mean is not None else None,
                "std": list(ctx.std) if ctx.std is not None else None,
                "ipc": self.synth.ipc, "synth_round": self.synthesized_round, "seed": ctx.config.seed,
                "num_classes": ctx.num_classes, "class_names": list(ctx.class_names), "model": ctx.config.model,
                "dataset": ctx.dataset,
                "snapshots": len(self.trajectory), "iterations_done": len(self.synthesis_loss),
                "failure": self.synthesis_failure,
                "lr_units": "class-mean KD loss (student SGD step on the cross-entropy = lr / num_classes)",
                "options": self.options()}

    def save(self, folder: str | os.PathLike) -> None:
        """Write pseudo.safetensors, pseudo.png and synthesis_loss.png into ``folder`` (if there is a set)."""
        from ..run import plot_curves

        if self.pseudo is None:
            return
        folder = Path(folder)
        save_pseudo_set(folder / PSEUDO_FILE, self.pseudo, self.metadata(), self.synthesis_loss)
        save_pseudo_grid(folder / GRID_FILE, self.pseudo, self.ctx.mean, self.ctx.std, self.ctx.class_names)
        rows = [{"iteration": i, "loss": v} for i, v in enumerate(self.synthesis_loss)]
        plot_curves({"trajectory matching": rows}, folder / LOSS_FILE, y="loss", x="iteration",
                    title=f"DynaFed synthesis (round {self.synthesized_round})", ylabel="MTT loss (eq. 2)")

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["trajectory"] = torch.stack(self.trajectory).clone() if self.trajectory else None
        state["synthesized_round"] = self.synthesized_round
        state["synthesis_loss"] = list(self.synthesis_loss)
        state["synthesis_failure"] = self.synthesis_failure
        state["pseudo"] = None if self.pseudo is None else {
            "images": self.pseudo.images.clone(), "label_logits": self.pseudo.label_logits.clone(), "lr": self.pseudo.lr}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        traj = state.get("trajectory")
        self.trajectory = [] if traj is None else [t.clone() for t in traj.unbind(0)]
        self.synthesized_round = state.get("synthesized_round")
        self.synthesis_loss = list(state.get("synthesis_loss") or [])
        self.synthesis_failure = state.get("synthesis_failure")
        p = state.get("pseudo")
        self.pseudo = None if p is None else PseudoSet(p["images"].clone(), p["label_logits"].clone(), float(p["lr"]))


__all__ = ["DynaFed", "DynaFedConfig", "PseudoSet", "Segment", "SynthesisConfig", "SynthesisResult", "sample_segment", "segment_target",
           "init_pseudo_set", "synthesize", "GlobalTrajectorySampler", "finetune_on_pseudo", "save_pseudo_set", "load_pseudo_set",
           "save_pseudo_grid", "make_augment"]
