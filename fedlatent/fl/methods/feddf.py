"""FedDF: ensemble distillation for model fusion (Lin, Kong, Stich & Jaggi, NeurIPS 2020).

Each round (Alg. 1 of the paper; Alg. 3 for heterogeneous "prototype" groups):

1. every selected client trains its own architecture locally from the server model of that architecture
   (local SGD, exactly FedAvg's client step) and uploads its weights;
2. per architecture, the server initialises the student by FedAvg over that architecture's accepted
   uploads (an architecture nobody of the round trained keeps its previous weights);
3. the teacher is the ensemble of ALL accepted client models, every architecture included: the
   mean of their logits, :func:`ensemble_logits`;
4. every student is distilled toward the teacher on an unlabeled transfer set by minimising
   ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (:func:`kd_loss`) with Adam (lr 1e-3, T = 1
   in the paper), for a fixed number of steps with early stopping on a held-out validation part of
   the transfer set: the validation KL to the teacher is measured every ``val_every`` steps, distillation
   stops after ``patience`` checks without improvement, and the best student is kept.

The teacher models are fixed during distillation and used in eval mode, so their logits on the
transfer set are computed once per round. Communication is FedAvg's: the student of the client's
architecture down, the client's weights up. The transfer set (see :mod:`fedlatent.fl.transfer`) lives
on the server and is never sent.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...utils import FedLatentError, torch_generator
from ..aggregate import fedavg
from ..base import ClientData, FLContext, Strategy, TensorDict, Upload, UploadSpec, register_method
from ..client import client_model, train_client
from ...train import fit
from ..options import make_config
from ..transfer import TransferSet, load_transfer_set, split_validation


@torch.no_grad()
def model_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode and without grad (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, int(x.shape[0]), batch_size)])
    finally:
        model.train(was)


@torch.no_grad()
def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The ensemble teacher of FedDF: (1/|S|) sum_{k in S} f(x; w_k), the mean of the models' logits.

    Every model is evaluated in eval mode; the result is ``[N, classes]`` float32.
    """
    if len(models) == 0:
        raise FedLatentError("ensemble_logits: no models")
    acc = None
    for m in models:
        z = model_logits(m, x, batch_size).double()
        acc = z if acc is None else acc + z
    return (acc / len(models)).float()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch (Hinton et al. 2015).

    Its gradient w.r.t. the student logits is ``T * (softmax(s / T) - softmax(t / T)) / batch``; the
    teacher is treated as a constant.
    """
    if not temperature > 0:
        raise FedLatentError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise FedLatentError(f"kd_loss: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@torch.no_grad()
def _val_kd(student: nn.Module, x: torch.Tensor, teacher: torch.Tensor, temperature: float, batch_size: int) -> float:
    z = model_logits(student, x, batch_size)
    return float(kd_loss(z, teacher, temperature))


def distill(student: nn.Module, x: torch.Tensor, teacher: torch.Tensor, *, steps: int, lr: float = 1e-3,
            batch_size: int = 64, temperature: float = 1.0, x_val: torch.Tensor | None = None,
            teacher_val: torch.Tensor | None = None, val_every: int = 50, patience: int = 3,
            generator: torch.Generator | None = None) -> dict[str, float]:
    """Distil ``student`` in place toward fixed ``teacher`` logits on ``x`` (FedDF's server step).

    Adam(lr), mini-batches drawn by epochs of seeded permutations from ``generator``, :func:`kd_loss`.
    With a validation set, the validation KD loss is checked before training and every ``val_every``
    steps; after ``patience`` checks without improvement training stops, and the student with the best
    validation loss is restored. Returns {"steps", "train_kd", "val_kd", "val_kd_start"} (val: NaN without one).
    """
    n = int(x.shape[0])
    if steps <= 0 or n == 0:
        return {"steps": 0.0, "train_kd": math.nan, "val_kd": math.nan, "val_kd_start": math.nan}
    has_val = x_val is not None and teacher_val is not None and len(x_val) > 0
    ebs = 4 * batch_size
    best = _val_kd(student, x_val, teacher_val, temperature, ebs) if has_val else math.inf
    start, bad = best, 0
    best_state = {k: t.detach().clone() for k, t in student.state_dict().items()} if has_val else None
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    st = {"step": 0, "loss_sum": 0.0, "seen": 0, "bad": 0, "best": best, "best_state": best_state}

    def after_step(loss: torch.Tensor, nb: int) -> bool:
        """Logging, the step budget and early stopping on the validation KD (True: stop)."""
        st["step"] += 1
        st["loss_sum"] += float(loss.detach()) * nb
        st["seen"] += nb
        step = st["step"]
        if has_val and (step % val_every == 0 or step == steps):
            v = _val_kd(student, x_val, teacher_val, temperature, ebs)
            if v < st["best"]:
                st["best"], st["bad"] = v, 0
                st["best_state"] = {k: t.detach().clone() for k, t in student.state_dict().items()}
            else:
                st["bad"] += 1
                if st["bad"] >= patience:
                    return True
        return step >= steps

    # a budget of `steps` minibatches over as many epochs of seeded permutations as that needs
    fit(student, x, teacher, opt, epochs=-(-steps // -(-n // batch_size)), batch_size=batch_size, generator=generator,
        loss_fn=lambda m, xb, tb: kd_loss(m(xb), tb, temperature), on_step=after_step)
    done, loss_sum, seen, best, best_state = st["step"], st["loss_sum"], st["seen"], st["best"], st["best_state"]
    if best_state is not None:  # the best validated student (the initial one if distillation never helped)
        student.load_state_dict(best_state)
    return {"steps": float(done), "train_kd": loss_sum / max(seen, 1),
            "val_kd": best if has_val else math.nan, "val_kd_start": start if has_val else math.nan}


@dataclass
class FedDFConfig:
    """Options of :class:`FedDF` (Lin et al. 2020, Alg. 1; see the module docstring)."""

    transfer: str = "public"
    """Unlabelled transfer set: 'public' (the FLConfig.public_fraction split), 'file:PATH' / PATH.safetensors (a
    distilled set) or 'generator:NAME' (generator samples); see :mod:`fedlatent.fl.transfer`."""
    transfer_size: int | None = None
    """Use this many transfer samples (None: all)."""
    distill_steps: int = 500
    """Server distillation steps per round (at most; early stopping may end sooner)."""
    distill_lr: float = 1e-3
    """Adam learning rate of the server distillation (paper: Adam, 1e-3)."""
    distill_batch_size: int = 64
    """Transfer minibatch size of the server distillation."""
    temperature: float = 1.0
    """Softmax temperature T of the KD loss T^2 KL(teacher/T || student/T) (paper: 1)."""
    val_fraction: float = 0.1
    """Held-out part of the transfer set for early stopping on the validation KL to the teacher."""
    val_every: int = 50
    """Validate every this many steps."""
    patience: int = 3
    """Stop after this many validations without improvement and keep the best student (paper's early stopping)."""

    def __post_init__(self):
        if self.distill_steps < 0 or self.distill_batch_size < 1 or self.val_every < 1 or self.patience < 1:
            raise FedLatentError("FedDF: distill_steps >= 0, distill_batch_size >= 1, val_every >= 1, patience >= 1")
        if not self.distill_lr > 0 or not self.temperature > 0:
            raise FedLatentError("FedDF: distill_lr and temperature must be > 0")
        if not 0 <= self.val_fraction < 1:
            raise FedLatentError(f"FedDF: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.transfer_size is not None and int(self.transfer_size) < 1:
            raise FedLatentError(f"FedDF: transfer_size must be >= 1, got {self.transfer_size}")
        self.transfer, self.transfer_size = str(self.transfer), None if self.transfer_size is None else int(self.transfer_size)
        self.distill_steps, self.distill_lr = int(self.distill_steps), float(self.distill_lr)
        self.distill_batch_size, self.temperature = int(self.distill_batch_size), float(self.temperature)
        self.val_fraction, self.val_every, self.patience = float(self.val_fraction), int(self.val_every), int(self.patience)


@register_method("feddf")
class FedDF(Strategy):
    """FedDF with per-architecture students (heterogeneous clients via ``FLConfig.client_models``)."""

    heterogeneous = True
    config_class = FedDFConfig

    def __init__(self, config: FedDFConfig | None = None, **options):
        self.config = make_config(FedDFConfig, config, options)
        vars(self).update(dataclasses.asdict(self.config))
        self.teacher_logits: torch.Tensor | None = None  # the last round's ensemble on the whole transfer set

    def setup(self, ctx: FLContext) -> None:
        super().setup(ctx)
        # "init" for every architecture: a homogeneous FedDF run starts from FedAvg's initial weights.
        self.students: dict[str, nn.Module] = {a: ctx.build_model(a, key="init") for a in ctx.architectures}
        self.labels = {a: ctx.arch_label(a) for a in ctx.architectures}
        self.transfer_set: TransferSet | None = None
        if self.distill_steps > 0:
            self.transfer_set = load_transfer_set(self.transfer, ctx, size=self.transfer_size)
            self.train_idx, self.val_idx = split_validation(len(self.transfer_set), self.val_fraction,
                                                            ctx.config.seed, "feddf")

    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        student = self.students[self.ctx.arch_of(client_id)]
        return {k: v.detach() for k, v in student.state_dict().items()}

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict,
                      data: ClientData) -> Upload:
        return train_client(ctx, rnd, payload, data, spec=ctx.arch_of(client_id))

    def expected_upload(self, client_id: int) -> UploadSpec:
        student = self.students[self.ctx.arch_of(client_id)]
        return {k: (tuple(v.shape), v.dtype) for k, v in student.state_dict().items()}

    def client_models(self, uploads: list[Upload]) -> list[nn.Module]:
        """The received client models (one per upload, of the client's architecture)."""
        models = []
        for u in uploads:
            m = client_model(self.ctx, self.ctx.arch_of(u.client_id))
            m.load_state_dict(u.tensors)
            models.append(m.eval())
        return models

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        ctx = self.ctx
        for arch, student in self.students.items():  # step 2: per-architecture FedAvg
            group = [u for u in uploads if ctx.arch_of(u.client_id) == arch]
            if group:
                student.load_state_dict(fedavg([u.tensors for u in group], [u.num_samples for u in group]))
        if self.transfer_set is None or self.distill_steps == 0:
            return {}
        x = self.transfer_set.x
        teacher = ensemble_logits(self.client_models(uploads), x)  # step 3: ensemble of every architecture
        self.teacher_logits = teacher
        x_tr, t_tr = x.index_select(0, self.train_idx.to(x.device)), teacher.index_select(0, self.train_idx.to(x.device))
        x_va, t_va = x.index_select(0, self.val_idx.to(x.device)), teacher.index_select(0, self.val_idx.to(x.device))
        extra: dict[str, float] = {}
        for arch, student in self.students.items():  # step 4: distil every student
            r = distill(student, x_tr, t_tr, steps=self.distill_steps, lr=self.distill_lr,
                        batch_size=self.distill_batch_size, temperature=self.temperature, x_val=x_va, teacher_val=t_va,
                        val_every=self.val_every, patience=self.patience,
                        generator=torch_generator(ctx.config.seed, "feddf-distill", rnd, arch))
            lab = self.labels[arch]
            extra[f"distill_steps_{lab}"] = r["steps"]
            extra[f"distill_val_kd_{lab}"] = r["val_kd"]
        return extra

    def eval_model(self) -> dict[str, nn.Module]:
        return {self.labels[a]: m for a, m in self.students.items()}

    def state_dict(self) -> dict:
        return {"students": {a: copy.deepcopy(m.state_dict()) for a, m in self.students.items()}}

    def load_state_dict(self, state: dict) -> None:
        for a, sd in state["students"].items():
            self.students[a].load_state_dict(sd)


__all__ = ["FedDFConfig", "model_logits", "ensemble_logits", "kd_loss", "distill", "FedDF"]
