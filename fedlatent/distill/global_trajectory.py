"""DynaFed's server-side synthesis (Pi et al., CVPR 2023, §3.2; reference pipilurj/DynaFed): distil the *global*
training trajectory into a small pseudo set with learnable soft labels and student step size, and the server
fine-tuning on it. The method around it (when to synthesise, the trajectory buffer, FedAvg):
:mod:`fedlatent.fl.methods.dynafed`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..artifacts.pseudo import PseudoSet
from ..errors import FedLatentError
from ..train import fit_on_set
from ..utils import derive_seed, torch_generator
from .augment import DSA, parse_strategy
from .samplers import GlobalTrajectorySampler, SegmentIndex

log = logging.getLogger("fedlatent.fl.dynafed")


def init_pseudo_set(num_classes: int, ipc: int, image_shape: Sequence[int], label_init: float, lr_teacher: float,
                    generator: torch.Generator) -> PseudoSet:
    """Noise images N(0, 1) (normalised space), ``ipc`` per class, labels ``label_init * onehot``."""
    if ipc < 1 or num_classes < 1:
        raise FedLatentError(f"ipc and num_classes must be >= 1, got {ipc}, {num_classes}")
    n = num_classes * ipc
    images = torch.randn((n, *image_shape), generator=generator, dtype=torch.float32)
    classes = torch.arange(num_classes).repeat_interleave(ipc)
    logits = torch.nn.functional.one_hot(classes, num_classes).float() * float(label_init)
    return PseudoSet(images, logits, float(lr_teacher))


# ---------------------------------------------------------------------------------------------
# Synthesis and fine-tuning


@dataclass
class SynthesisConfig:
    """Trajectory-matching hyper-parameters of the pseudo-set synthesis (see :class:`DynaFed`)."""

    ipc: int = 10
    iterations: int = 200
    syn_steps: int = 10
    expert_epochs: int = 3
    min_start: int = 0
    max_start: int = 50
    weight_averaging: bool = True
    least_ave_num: int = 2
    max_ave_num: int = 10
    lr_img: float = 0.05
    lr_label: float = 0.01
    lr_lr: float = 1e-5
    lr_teacher: float = 0.4
    label_init: float = 5.0
    batch_syn: int | None = None
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    mtt_mode: str = "exact"


@dataclass
class SynthesisResult:
    pseudo: PseudoSet | None          # None when not a single iteration succeeded
    losses: list[float] = field(default_factory=list)
    segments: list[SegmentIndex] = field(default_factory=list)
    failure: str | None = None
    seconds: float = 0.0


def make_augment(enabled: bool, strategy: str) -> Callable[[torch.Tensor, int | None], torch.Tensor] | None:
    """DSA as in the reference (one transformation group per call, per-image parameters), or None."""
    if not enabled or not parse_strategy(strategy):
        return None
    return DSA(strategy, siamese=False)


def synthesize(student: nn.Module, snapshots: Sequence[torch.Tensor], num_classes: int,
               image_shape: Sequence[int], cfg: SynthesisConfig, seed: int, device: str | torch.device = "cpu",
               progress: bool = True) -> SynthesisResult:
    """Distil the global trajectory ``snapshots`` into a pseudo set (DynaFed §3.2, MTT eqs. 1-2).

    Runs :class:`fedlatent.distill.distiller.Distiller` (the MTT engine) on a :class:`PixelSet` of
    noise images with learnable soft-label logits, the segments of :class:`GlobalTrajectorySampler`,
    and the reference's optimisers: Adam(lr_img) on the pixels, Adam(lr_label) on the label logits
    and Adam on the learnable step size (the engine learns ``log lr``: Adam's step ``lr_lr`` on the
    lr itself is ``lr_lr / lr_teacher`` on its log at the initial value).

    Every random choice comes from ``seed``: noise (seed, "dynafed", "init"), segments (seed,
    "dynafed", "segment", i), minibatches and augmentation (the engine's stream of
    derive_seed(seed, "dynafed")). A :class:`FedLatentError` about a non-finite loss, gradient or
    update ends the loop early; the engine leaves the set as it was before the failing update and
    ``result.pseudo`` holds it (None when not a single iteration succeeded).
    """
    from ..synthetic import PixelSet
    from .distiller import DistillConfig, Distiller

    t0 = time.perf_counter()
    snaps = [s.detach().to(device=device, dtype=torch.float32) for s in snapshots]
    sampler = GlobalTrajectorySampler(snaps, cfg, seed)
    init = init_pseudo_set(num_classes, cfg.ipc, image_shape, cfg.label_init, cfg.lr_teacher,
                           torch_generator(seed, "dynafed", "init")).to(device)
    pixels = PixelSet(init.images)
    engine_cfg = DistillConfig(
        syn_steps=cfg.syn_steps, expert_epochs=cfg.expert_epochs, max_start_epoch=max(1, cfg.max_start),
        batch_syn=cfg.batch_syn, lr_img=cfg.lr_img, lr_label=cfg.lr_label,
        lr_teacher=cfg.lr_teacher / num_classes,  # reference units (class-mean KD loss) -> cross-entropy step
        mode=cfg.mtt_mode, dsa=cfg.dsa, dsa_strategy=cfg.dsa_strategy, dsa_siamese=False,
        seed=derive_seed(seed, "dynafed"))
    distiller = Distiller(student, pixels, init.label_logits, sampler, engine_cfg,
                          image_optimizer=torch.optim.Adam(pixels.parameters(), lr=cfg.lr_img))
    # The reference optimises the labels and the lr with Adam (the engine's default is SGD + momentum).
    distiller.opt_label = torch.optim.Adam([distiller.labels], lr=cfg.lr_label)
    distiller.opt_lr = torch.optim.Adam([distiller.log_lr], lr=cfg.lr_lr / cfg.lr_teacher)
    res = SynthesisResult(pseudo=None)

    def postfix(step) -> dict | None:  # every 10th iteration and the last, lr in the reference's units
        if step.it % 10 == 0 or step.it == cfg.iterations - 1:
            return {"loss": f"{step.loss:.4f}", "lr": f"{step.lr * num_classes:.4g}"}
        return None

    distiller.run(cfg.iterations, progress, desc="dynafed synthesis", postfix=postfix, stop_on_divergence=True)
    res.losses = [float(h.loss) for h in distiller.history]
    res.failure = distiller.failure
    res.segments = sampler.segments[: len(res.losses)]
    if res.failure:
        log.warning("DynaFed synthesis stopped at %s; keeping the pseudo set of the last good iteration (%d done)",
                    res.failure, len(res.losses))
    if res.losses:
        res.pseudo = PseudoSet(pixels.render().detach().clone(), distiller.labels.detach().clone(),
                               distiller.lr * num_classes).to("cpu")
    res.seconds = time.perf_counter() - t0
    return res


def finetune_on_pseudo(model: nn.Module, pseudo: PseudoSet, *, epochs: int, lr: float, batch_size: int,
                       augment: Callable[[torch.Tensor, int | None], torch.Tensor] | None,
                       generator: torch.Generator) -> float:
    """DynaFed's server step (reference ``Server.datadistill``): ``epochs`` passes of Adam(lr) over the
    pseudo set in shuffled minibatches, loss ``-sum_k softmax(Y)_k log softmax(f(A(x)))_k``.

    Shuffles and augmentation seeds come from ``generator``. Returns the mean minibatch loss (nan
    when no step was taken).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return fit_on_set(model, pseudo.images, pseudo.label_logits, opt, epochs=epochs, batch_size=batch_size,
                      augment=augment, generator=generator)


__all__ = ["SynthesisConfig", "SynthesisResult", "init_pseudo_set", "make_augment", "synthesize", "finetune_on_pseudo"]
