"""FedDGM (Jia et al., arXiv 2312.01537; reference FedDG23/FedDG-main): federated learning through
server-side *latent* trajectory matching (ALGORITHMS.md §2, §4).

One round:

1. **Clients.** Every selected client receives the global *surrogate* (a ConvNet, flat parameter vector
   ``params``), trains ``local_epochs`` of SGD on its data (FLConfig ``lr`` / ``momentum`` / ``weight_decay``;
   reference: lr 0.01, no momentum) and uploads its start and end parameters ``{"start", "end"}`` only,
   screened by :func:`fedlatent.fl.validate.validate_uploads` and dropped when ``start`` is not what was sent.
2. **Server distillation, per client.** ``ipc`` latents per class for *all* classes are initialised from the
   generator (``z ~ N(0, I)``, ``w = mapping(z, c)``, f_k rendered from w; pixel space: N(0, 1) noise), so no
   client data ever reaches the server. Latent MTT (MTT eqs. 1-2 through the generator, GLaD) then matches the
   one-segment trajectory ``start -> end`` of that client: the student starts at ``start``, takes ``syn_steps``
   SGD steps (learnable lr) on the DSA-augmented rendered images, and the latents move to minimise
   ``||theta_N - end||^2 / ||start - end||^2``. This is :class:`fedlatent.distill.distiller.Distiller` with a
   :class:`fedlatent.generators.LatentSet` (chunked renderer) or a :class:`fedlatent.synthetic.PixelSet`, and
   the exact constant-memory meta-gradient (the reference uses TESLA's approximate backward).
3. **Pool and train.** The rendered sets of all clients are pooled (this round's only, as the reference; or
   every round's with ``pool="all"``); the global model (any registry architecture, ``FLConfig.model``) and -
   when it is another architecture - the surrogate are trained on the pool for ``train_epochs`` epochs (SGD,
   DSA). There is no weight averaging: the surrogate trained on the pool is the next round's download.

Batched clients: :mod:`fedlatent.distill.batched`; ``fedlatent distill``'s driver: :mod:`fedlatent.apps.distill`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ... import compiling
from ...artifacts import DISTILLED_FILE, GRID_PATTERN
from ...artifacts.grids import save_class_grid
from ...distill.augment import DEFAULT_STRATEGY, DSA, parse_strategy
from ...distill.batched import distill_clients
from ...distill.distiller import DistillConfig, Distiller
from ...distill.kernels import ENGINES
from ...distill.pool import DistilledSet, Pool, harvest, map_distillation, pool_round, round_record
from ...errors import FedLatentError
from ...generators.resolve import default_generator, default_space, generator_identity, worker_generator
from ...models.functional import FlatModel
from ...train import LR_SCHEDULES, fit_on_set, schedule_lr
from ...utils import class_indices, derive_seed, torch_generator
from ..base import ClientData, FLContext, Strategy, TensorDict, Upload, UploadSpec, register_method
from ..client import _privacy, client_model, local_train
from ..label_inference import client_labels
from ..options import check_int, check_number, make_config

log = logging.getLogger("fedlatent.fl.feddgm")


@dataclass
class FedDGMConfig:
    """Options of :class:`FedDGM`. Every default is the reference's value (FedDG23/FedDG-main: its CIFAR-10 README
    command, else the argparse defaults of fed_main.py / shared_args.py; the source is named at each field), except
    where a field says it deviates and why. ``fedlatent distill`` starts from a preset instead
    (:data:`fedlatent.apps.distill.PRESETS`), which says where it differs.

    Deviations from the reference, by design: the meta-gradient is exact (``mtt_mode``; the reference uses TESLA's
    approximate backward), and the synthetic labels may be learned (``soft_labels``; the reference keeps hard
    labels)."""

    owner: ClassVar[str] = "feddgm"  # the method these options belong to (the prefix of their error messages)

    generator: str | None = None
    """Generator: a manifest name (``fedlatent pretrained list``) or a checkpoint path; None = the dataset's
    default (:func:`fedlatent.generators.resolve.default_generator`)."""
    space: str | None = None
    """Latent space ``F<k>``, ``W+`` or ``pixel`` (GLaD); None = :func:`fedlatent.generators.resolve.default_space`
    (F5 for StyleGAN-XL, as the reference's CIFAR-10 layer)."""
    ipc: int = 10
    """Distilled images per class per client (reference: ``--ipc=10``, README)."""
    iterations: int = 100
    """MTT iterations per client and round (reference: ``--Iteration 100``, README)."""
    syn_steps: int = 20
    """Student steps per MTT iteration (MTT eq. 1; reference: ``--syn_steps`` 20, fed_main.py)."""
    lr_img: float = 1000.0
    """SGD step on the f_k features / pixels (reference: ``--lr_img`` 1000, fed_main.py)."""
    lr_w: float = 1.0
    """SGD step on the w+ latents (reference: ``--lr_w`` 1, fed_main.py)."""
    lr_lr: float = 1e-5
    """SGD step on the learnable student lr in the reference's units (on the lr itself; reference: ``--lr_lr``
    1e-5, fed_main.py); the engine learns log lr with ``lr_lr / lr_teacher**2``."""
    lr_teacher: float = 0.01
    """Initial student lr (reference: ``--lr_teacher`` 0.01, fed_main.py)."""
    momentum: float = 0.5
    """Momentum of the latent / lr optimisers (reference: 0.5 in glad_utils.py and server_update.py, MTT's)."""
    batch_syn: int | None = None
    """Synthetic images per student step; None = the whole set (reference: ``--batch_syn`` None)."""
    init: str = "random"
    """Latent initialisation: 'random' (z ~ N(0, I) through the mapping, as the reference) or 'mean_w'."""
    warm_start: bool = False
    """Start each client's set where its previous set ended, instead of fresh latents every round (beyond the
    reference, which re-initialises each round: fed_main.py calls ``prepare_latents`` per client and round). The
    latents then keep what the earlier rounds' trajectories - those from a barely trained surrogate - put into
    them, and each round's matching refines them. A client's first set, or one whose classes changed
    (``classes="inferred"``), starts fresh; the premise check compares with that chain's fresh start. Measured on
    the CIFAR-10 cell (benchmarks/RESULTS.md, "Warm-started latents"): worse on both counts - the final accuracy
    drops by 7 points and the pool trains fresh networks below its chains' starting draws - so it is off."""
    soft_labels: bool = False
    """Learn soft-label logits with the latents (beyond the reference, which keeps hard labels; DynaFed learns
    them): the labels start at ``label_init * onehot`` and take SGD steps of ``lr_label`` on the MTT loss; the
    server trains on them with the soft cross-entropy. Off the batched path (it supports hard labels only)."""
    label_init: float = 5.0
    """Soft-label logits start at ``label_init * onehot`` (DynaFed's engine default)."""
    lr_label: float = 2.0
    """SGD step (with ``momentum``) on the soft-label logits."""
    dsa: bool = True
    """Differentiable siamese augmentation in the student steps (reference: ``--dsa`` True, shared_args.py)."""
    dsa_strategy: str = DEFAULT_STRATEGY
    """DSA transformations (reference: ``color_crop_cutout_flip_scale_rotate``, shared_args.py)."""
    mtt_mode: str = "exact"
    """Meta-gradient: 'exact' (constant memory; the reference: TESLA's approximation) or 'unrolled'."""
    mtt_engine: str = "auto"
    """MTT engine (:data:`fedlatent.distill.kernels.ENGINES`): 'auto' (fp32 ConvNet kernel), 'fast' (bf16 convs +
    torch.compile where the CPU has them: within the stated tolerance of fp32, not bitwise) or a named one."""
    render_engine: str = "eager"
    """The generator's rendering: 'eager', 'compiled' (``torch.compile``: within float32 rounding of eager, not
    bitwise; the first render compiles for ~20 s) or 'fast' (compiled where the 'fast' MTT engine compiles, else
    eager)."""
    chunk_size: int = 64
    """Images rendered per generator call (memory); a set of at most this many renders once per iteration."""
    surrogate: str = "convnet"
    """The buffer-free ConvNet the clients train and the server matches (any ConvNet spec, e.g.
    ``convnet:width=32``); the global model is FLConfig ``model``. Deviation: ``convnet`` picks its depth from the
    image size (D3 up to 32 px, as MTT and GLaD); the reference passes ``--depth 5 --width 128``
    (shared_args.py) to every ConvNet, which the "paper" preset uses (``convnet-d5:width=128``)."""
    train_epochs: int = 1000
    """Server epochs on the pooled distilled sets per round (reference: ``--inner_loop`` 1000 of ``epoch_global``
    in fed_main.py)."""
    train_lr: float = 0.01
    """Server training SGD lr (reference: ``--lr_net`` 0.01, fed_main.py)."""
    train_schedule: str = "constant"
    """Server training lr over its ``train_epochs`` (:func:`fedlatent.train.lr_factor`): 'constant' (reference:
    one ``SGD(lr=args.lr_net)``, fed_main.py), 'step' (10x decay after half the epochs, MTT's evaluation) or
    'cosine' (beyond the reference)."""
    train_momentum: float = 0.0
    """Server training SGD momentum (reference: 0, fed_main.py builds ``SGD(net.parameters(), lr=args.lr_net)``)."""
    train_weight_decay: float = 0.0
    """Server training weight decay (reference: 0, same optimiser)."""
    train_batch: int = 256
    """Server training minibatch size (reference: ``--batch_train`` 256 in its CIFAR-10 command)."""
    train_dsa: bool = True
    """DSA during server training (reference: ``epoch_global(..., aug=args.dsa)``, dsa True)."""
    train_engine: str = "autograd"
    """Server training's gradient (:func:`fedlatent.train.fit_on_set`): 'autograd', or an MTT kernel engine (the
    hand-written ConvNet backward; 'fast': bf16 convolutions + torch.compile where the CPU has them, each step's
    gradient within 5 % relative L2 of fp32 autograd's, not bitwise)."""
    client_engine: str = "autograd"
    """The clients' local training gradient (:func:`fedlatent.fl.client.local_train` ``engine``): 'autograd', or an
    MTT kernel engine ('fast': bf16 convolutions + torch.compile where the CPU has them, the tolerance of
    ``train_engine``). A simulation speed setting: the uploads stay start / end parameters."""
    pool: str = "round"
    """Which distilled sets train the global model: this round's ('round', as the reference) or all rounds' ('all')."""
    batched: bool | str = "auto"
    """How the server distils the clients: one after the other (False); as one grouped computation (True or
    'grouped', :func:`fedlatent.distill.batched.batched_meta_gradient`); several at a time in threads, one
    intra-op thread each ('threads': bitwise the one-thread loop, whatever the core count); or 'auto': grouped on
    CUDA, threads on a CPU (there the grouped batch measured slower than the loop and the threads 0.86-0.98x its
    time: benchmarks/RESULTS.md, "Server throughput"; with one intra-op thread, the loop). Soft labels and the
    unrolled meta-gradient are off the grouped path (the loop instead)."""
    max_batch: int | None = None
    """At most this many clients per batch (None: as many as memory allows)."""
    classes: str = "all"
    """Classes of a client's ``ipc * num_classes`` synthetic images: 'all' (``ipc`` each, as the reference) or
    'inferred' (beyond the paper): spread over the classes whose output bias the client's upload raised
    (:mod:`fedlatent.fl.label_inference`; it reads only the upload, but it does read labels off it)."""
    dataset: str | None = None
    """The data set's name: picks the default generator and goes into the export metadata."""
    progress: bool = True
    """Progress bars during the distillation."""
    save_artifacts: bool = True
    """Write grids and distilled.safetensors into the run folder."""

    def __post_init__(self):
        from ...generators.latent import parse_space

        own = self.owner
        self.generator = None if self.generator in (None, "", "none") else str(self.generator)
        self.space = None if self.space in (None, "", "auto") else str(self.space)
        if self.space is not None:
            parse_space(self.space)
        for name, lo in (("ipc", 1), ("iterations", 0), ("syn_steps", 1), ("chunk_size", 1), ("train_epochs", 0),
                         ("train_batch", 1)):
            setattr(self, name, check_int(own, name, getattr(self, name), lo))
        for name in ("lr_img", "lr_w", "lr_lr", "momentum", "label_init", "lr_label", "train_lr", "train_momentum",
                     "train_weight_decay"):
            setattr(self, name, check_number(own, name, getattr(self, name)))
        self.lr_teacher = check_number(own, "lr_teacher", self.lr_teacher, positive=True)
        self.batch_syn = None if self.batch_syn is None else check_int(own, "batch_syn", self.batch_syn, 1)
        self.max_batch = None if self.max_batch is None else check_int(own, "max_batch", self.max_batch, 1)
        for name in ("soft_labels", "warm_start", "dsa", "train_dsa", "progress", "save_artifacts"):
            setattr(self, name, bool(getattr(self, name)))
        for name, allowed in (("init", ("random", "mean_w")), ("mtt_mode", ("exact", "unrolled")),
                              ("mtt_engine", ENGINES), ("train_engine", ENGINES), ("client_engine", ENGINES),
                              ("render_engine", ("eager", "compiled", "fast")),
                              ("pool", ("round", "all")), ("train_schedule", LR_SCHEDULES),
                              ("batched", (True, False, "auto", "grouped", "threads")), ("classes", ("all", "inferred"))):
            if getattr(self, name) not in allowed:
                raise FedLatentError(f"{own}: {name} must be one of {', '.join(map(repr, allowed))}, got "
                                     f"{getattr(self, name)!r}")
        self.dsa_strategy, self.surrogate = str(self.dsa_strategy), str(self.surrogate)
        parse_strategy(self.dsa_strategy)
        self.dataset = None if self.dataset is None else str(self.dataset)


@register_method("feddgm")
class FedDGM(Strategy):
    """FedDGM: client trajectories -> server latent MTT per client -> train on the pooled distilled sets.
    Options: :class:`FedDGMConfig` (``FedDGM(config)`` or ``FedDGM(**options)``).

    ``distill_map`` (not an option; set by :meth:`fedlatent.backends.ray.RayBackend.attach`): a client runner
    ``(fn, jobs) -> [fn(*job) ...]``; when set, the looped per-client distillation runs through it, one
    :meth:`distill_client` job per client (the batched path ignores it). What a parallel runner ships to its
    workers is :meth:`worker_view`.
    """

    config_class = FedDGMConfig
    label: ClassVar[str] = "FedDGM"  # the method's name in figure titles
    distill_map: Callable[[Callable, Sequence[tuple]], list] | None = None

    def __init__(self, config: FedDGMConfig | None = None, **options):
        from ...generators.latent import PIXEL, parse_space

        self.config = make_config(self.config_class, config, options)
        d = dataclasses.asdict(self.config)
        # the names the strategy has always used for these three (generator/space are resolved in setup)
        self.generator_name, self.surrogate_spec, self.pool_mode = d.pop("generator"), d.pop("surrogate"), d.pop("pool")
        vars(self).update(d)
        self._pixel = self.space is not None and parse_space(self.space) == PIXEL
        self.pool, self.round_log = None, []  # Pool | None, list[dict]: the round log
        self.carry: dict[int, dict] = {}  # warm_start: client id -> its last set ({"origin", "labels", ...})

    def options(self) -> dict[str, Any]:
        o = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("progress", "save_artifacts")}
        o.update(generator=self.generator_name, space=self.space)  # as resolved by setup
        return o

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, ctx: FLContext) -> None:
        from ...generators import load_generator
        from ...generators.latent import PIXEL, parse_space
        from ...generators.registry import complete_generator_spec, no_generator_message

        super().setup(ctx)
        self.G = None
        if not self._pixel:
            self.dataset = self.dataset or getattr(ctx, "dataset", None)  # the run's data set: its default generator
            name = self.generator_name or default_generator(self.dataset or "")
            if name is None:
                raise FedLatentError(f"{self.name}: " + no_generator_message(self.dataset or "DATASET"))
            name = complete_generator_spec(name, ctx.channels, ctx.image_size, ctx.num_classes)  # random:...
            self.G = load_generator(name, device=ctx.device)
            self._g_source = (name, self.G)  # worker_view ships this G by name (a worker loads it itself)
            self.generator_name = name
            if self.space is None:
                self.space = default_space(self.G)
            if parse_space(self.space) == PIXEL:
                self._pixel, self.G = True, None
            else:
                if self.G.img_channels != ctx.channels:
                    raise FedLatentError(f"{self.name}: generator {name!r} makes {self.G.img_channels}-channel "
                                         f"images, the dataset has {ctx.channels}")
                if self.G.c_dim and self.G.c_dim < ctx.num_classes:
                    raise FedLatentError(f"{self.name}: generator {name!r} knows {self.G.c_dim} classes, the "
                                         f"dataset has {ctx.num_classes}")
                self.G.check_k(parse_space(self.space))
        self.space = "pixel" if self._pixel else self.space
        self.generator_sha256 = generator_identity(self.generator_name)[1] if self.G is not None else None
        self.model = ctx.build_model()
        self.surrogate = (self.model if self.surrogate_spec == ctx.config.model
                          else ctx.build_model(self.surrogate_spec, key="feddgm-surrogate"))
        if any(True for _ in self.surrogate.buffers()):
            raise FedLatentError(f"{self.name}: the surrogate {self.surrogate_spec!r} has buffers (e.g. batch norm); "
                                 "trajectory matching needs a buffer-free student such as the instance-norm ConvNet")
        self.flat = FlatModel(self.surrogate)
        self._sent: tuple[int, torch.Tensor] | None = None
        self.pool, self.round_log, self.carry = None, [], {}

    # -- engine hooks ----------------------------------------------------------------------------------
    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        if self._sent is None or self._sent[0] != rnd:
            self._sent = (rnd, self.flat.flatten())
        return {"params": self._sent[1]}

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict, data: ClientData) -> Upload:
        cfg = ctx.config
        model = client_model(ctx, self.surrogate_spec)
        flat = FlatModel(model)
        start = payload["params"].detach()
        flat.load(start)
        metrics = local_train(model, data.x, data.y, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              generator=torch_generator(cfg.seed, "client", rnd, data.client_id),
                              privacy=_privacy(ctx, data.client_id),  # DP-SGD with FLConfig.dp (fedlatent.privacy.dp)
                              engine=self.client_engine)
        return Upload(client_id=data.client_id, tensors={"start": start.clone(), "end": flat.flatten()},
                      num_samples=len(data), metrics=metrics)

    def expected_upload(self, client_id: int) -> UploadSpec:
        p = next(self.surrogate.parameters())
        return {"start": ((self.flat.numel,), p.dtype), "end": ((self.flat.numel,), p.dtype)}

    def eval_model(self) -> nn.Module:
        return self.model

    # -- the server ------------------------------------------------------------------------------------
    def _synthetic(self, seed: int, classes: torch.Tensor | None = None):
        """A fresh synthetic set for one client, ``ipc`` per class or one per entry of ``classes``: latents (or
        pixel noise) and the labels."""
        from ...generators.latent import LatentSet
        from ...synthetic import PixelSet

        ctx = self.ctx
        classes = torch.arange(ctx.num_classes).repeat_interleave(self.ipc) if classes is None else classes.cpu()
        labels = classes.to(ctx.device)
        if self.soft_labels:  # learned logits, label_init * onehot (fedlatent.distill.distiller: float labels)
            labels = nn.functional.one_hot(labels, ctx.num_classes).float() * self.label_init
        if self._pixel:
            g = torch_generator(seed, "init", "pixel")
            x = torch.randn(len(labels), ctx.channels, ctx.image_size, ctx.image_size, generator=g)
            syn = PixelSet(x.to(ctx.device))
            return syn, labels, torch.optim.SGD(syn.parameters(), lr=self.lr_img, momentum=self.momentum)
        ls = LatentSet.initialize(self.G, self.space, self.ipc, num_classes=ctx.num_classes, seed=seed, init=self.init,
                                  mean=ctx.mean, std=ctx.std, chunk_size=self.chunk_size, image_size=ctx.image_size,
                                  labels=classes, compile=self._compiled_render())
        return ls, labels, torch.optim.SGD(ls.param_groups(self.lr_w, self.lr_img, self.momentum), lr=self.lr_w)

    def _compiled_render(self) -> bool:
        fast = self.render_engine == "fast" and compiling.usable_on(self.ctx.device)
        return self.render_engine == "compiled" or fast

    def initial_synthetic(self, rnd: int, client_id: int, classes: torch.Tensor | None = None):
        """The synthetic set a client's distillation starts from in round ``rnd`` (seeded by (seed, round, client);
        ``classes``: its images' classes under ``classes="inferred"``; also what :mod:`fedlatent.apps.premise`
        renders as the no-MTT reference): ``(set, labels, optimiser)``."""
        seed = derive_seed(derive_seed(self.ctx.config.seed, "feddgm", rnd, client_id), "latents")
        return self._synthetic(seed, classes)

    def origin_round(self, rnd: int, client_id: int) -> int:
        """The round whose fresh draw the set distilled for ``client_id`` in round ``rnd`` started from: ``rnd``
        itself, or under ``warm_start`` the first round of that client's chain."""
        return int(self.carry.get(int(client_id), {}).get("origins", {}).get(int(rnd), rnd))

    def _set_classes(self, u: Upload) -> torch.Tensor | None:
        """The classes of the set distilled from upload ``u``: None (``ipc`` of each) or, under
        ``classes="inferred"``, those its trajectory shows (:func:`fedlatent.fl.label_inference.client_labels`)."""
        if self.classes != "inferred":
            return None
        start, end = (u.tensors[k].detach().to(self.ctx.device) for k in ("start", "end"))
        return client_labels(self.flat, start, end, self.ipc * self.ctx.num_classes)

    def _continued(self, client_id: int, classes: torch.Tensor | None) -> dict | None:
        """``warm_start``: the client's previous set (:attr:`carry`) when its next set continues it (there is one,
        with these classes), else None: a fresh start."""
        prev = self.carry.get(int(client_id)) if self.warm_start else None
        want = torch.arange(self.ctx.num_classes).repeat_interleave(self.ipc) if classes is None else classes.cpu()
        return prev if prev is not None and torch.equal(class_indices(prev["labels"]).long(), want.long()) else None

    def _warm_synthetic(self, prev: dict):
        """``(set, labels, optimiser)`` starting at a previous set's latents (pixels in pixel space) and labels."""
        from ...generators.latent import LatentSet
        from ...synthetic import PixelSet

        ctx, dev = self.ctx, self.ctx.device
        labels = prev["labels"].to(dev)
        if self._pixel:
            syn = PixelSet(prev["images"].to(dev))
            return syn, labels, torch.optim.SGD(syn.parameters(), lr=self.lr_img, momentum=self.momentum)
        f = None if prev["f_k"] is None else prev["f_k"].to(dev)
        syn = LatentSet(self.G, self.space, class_indices(prev["labels"]), ws=prev["ws"].to(dev), f=f, mean=ctx.mean,
                        std=ctx.std, chunk_size=self.chunk_size, image_size=ctx.image_size,
                        compile=self._compiled_render())
        return syn, labels, torch.optim.SGD(syn.param_groups(self.lr_w, self.lr_img, self.momentum), lr=self.lr_w)

    def _remember(self, rnd: int, sets: Sequence[DistilledSet], uploads: Sequence[Upload]) -> None:
        """``warm_start``: keep each usable set of round ``rnd`` as where its client's next set starts, with the
        round its chain began (decided by :meth:`_continued`, the rule :meth:`make_distillers` applied)."""
        for u, st in zip(uploads, sets):
            if st.images is None or not torch.isfinite(st.images).all():
                continue  # a failed set: the client's chain goes on from its last good set
            cid = int(u.client_id)
            prev = self._continued(cid, self._set_classes(u))
            origins = dict(self.carry.get(cid, {}).get("origins", {}))
            origins[int(rnd)] = int(prev["origin"]) if prev is not None else int(rnd)
            self.carry[cid] = {"origin": origins[int(rnd)], "labels": st.labels, "ws": st.ws, "f_k": st.f_k,
                               "images": st.images if self._pixel else None, "origins": origins}

    def make_distillers(self, rnd: int, uploads: Sequence[Upload]) -> list[Distiller]:
        """One engine Distiller per upload: start -> end segment; fresh latents seeded (seed, round, client), or
        under ``warm_start`` the client's previous set (:meth:`_continued`)."""
        ctx = self.ctx
        out = []
        for u in uploads:
            seed = derive_seed(ctx.config.seed, "feddgm", rnd, u.client_id)
            start, end = (u.tensors[k].detach().to(ctx.device) for k in ("start", "end"))
            classes = self._set_classes(u)  # under classes="inferred": the budget over the classes the upload shows
            prev = self._continued(u.client_id, classes)
            syn, labels, opt = (self._warm_synthetic(prev) if prev is not None
                                else self.initial_synthetic(rnd, u.client_id, classes))
            cfg = DistillConfig(syn_steps=self.syn_steps, expert_epochs=1, max_start_epoch=1, batch_syn=self.batch_syn,
                                lr_img=self.lr_img, lr_lr=self.lr_lr / self.lr_teacher ** 2,
                                lr_label=self.lr_label if self.soft_labels else 0.0,
                                lr_teacher=self.lr_teacher, momentum=self.momentum, mode=self.mtt_mode,
                                engine=self.mtt_engine, dsa=self.dsa and bool(parse_strategy(self.dsa_strategy)),
                                dsa_strategy=self.dsa_strategy, dsa_siamese=False, seed=derive_seed(seed, "mtt"))
            out.append(Distiller(self.surrogate, syn, labels, (lambda it, s=start, e=end: (s, e)), cfg,
                                 image_optimizer=opt))
        return out

    def _use_batched(self) -> bool | str:
        """The ``distill_clients`` mode of :attr:`batched`: 'auto' is the grouped batch on CUDA and the clients in
        threads on a CPU; the grouped batch only where it can run (exact meta-gradient, hard labels), else the loop."""
        mode = self.batched
        if mode == "auto":
            mode = True if torch.device(self.ctx.device).type == "cuda" else "threads"
        if mode in (True, "grouped") and (self.mtt_mode != "exact" or self.soft_labels):
            return False
        return mode

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        _, moved, extra = self._screen(rnd, uploads)
        if not moved:
            log.warning("round %d: no usable client trajectory; the global state is unchanged", rnd)
            return extra
        return self._distil_and_train(rnd, moved, extra)

    def _screen(self, rnd: int, uploads: list[Upload]) -> tuple[list[Upload], list[Upload], dict[str, float]]:
        """The server's own screening, by client id: (the uploads whose ``start`` is the surrogate sent this round,
        those of them that moved (``end != start``: a trajectory to distil), the counts ``start_mismatch`` and
        ``unchanged``)."""
        sent = self._sent[1] if self._sent is not None else self.flat.flatten()
        trusted: list[Upload] = []
        moved: list[Upload] = []
        for u in sorted(uploads, key=lambda u: u.client_id):
            if not torch.equal(u.tensors["start"].to(sent), sent):
                log.warning("round %d: client %d uploaded a start that is not the global surrogate; dropped",
                            rnd, u.client_id)
                continue
            trusted.append(u)
            if torch.equal(u.tensors["end"], u.tensors["start"]):
                log.warning("round %d: client %d did not move (end == start); nothing to distil", rnd, u.client_id)
            else:
                moved.append(u)
        counts = {"start_mismatch": float(len(uploads) - len(trusted)), "unchanged": float(len(trusted) - len(moved))}
        return trusted, moved, counts

    def _distil_and_train(self, rnd: int, good: list[Upload], extra: dict[str, float]) -> dict[str, float]:
        """Steps 2-3 of the round (module docstring): distil every client of ``good``, pool the sets, train on the
        pool, log the round; returns ``extra`` with the round's metrics added."""
        sets, bsz, t_distill = self._distil_round(rnd, good)
        if self.warm_start:
            self._remember(rnd, sets, good)
        this_round, dropped = pool_round(sets, [u.client_id for u in good], rnd)
        extra["distill_dropped"] = float(len(dropped))
        if this_round is None:
            return extra
        self.pool = this_round if self.pool_mode == "round" or self.pool is None else Pool.cat([self.pool, this_round])
        t1 = time.perf_counter()
        train_loss = self._train_on_pool(rnd)
        t_train = time.perf_counter() - t1
        entry, metrics = round_record([st.run for st in sets], rnd, bsz, dropped)
        self.round_log.append(entry)
        extra.update(metrics)
        extra.update({"pool_size": float(len(self.pool.images)), "server_train_loss": train_loss["global"],
                      "distill_s": t_distill, "server_train_s": t_train, "distill_batch": float(bsz)})
        if "surrogate" in train_loss:
            extra["surrogate_train_loss"] = train_loss["surrogate"]
        if self.save_artifacts and getattr(self.ctx, "run_dir", None):
            self.save_round(self.ctx.run_dir, rnd)
        return extra

    def _distil_round(self, rnd: int, good: list[Upload]) -> tuple[list[DistilledSet], int, float]:
        """Server distillation, one set per client of ``good``: looped here, batched (:mod:`fedlatent.distill.batched`)
        or through a parallel runner (:attr:`distill_map`). Returns (sets, clients per batch, seconds)."""
        ids = [u.client_id for u in good]
        t0 = time.perf_counter()
        use_batch = self._use_batched()
        if self.distill_map is not None and use_batch in (False, "threads"):  # a parallel backend runs the loop
            sets = map_distillation(self.distill_map, self.distill_client, rnd, ids, good)
            return sets, 1, time.perf_counter() - t0
        distillers = self.make_distillers(rnd, good)
        runs, bsz = distill_clients(distillers, ids, self.iterations, batched=use_batch, max_batch=self.max_batch,
                                    device=self.ctx.device, progress=self.progress, desc=f"{self.name} round {rnd}")
        t_distill = time.perf_counter() - t0
        return [harvest(d, r, self._pixel) for d, r in zip(distillers, runs)], bsz, t_distill

    def _train_on_pool(self, rnd: int) -> dict[str, float]:
        """Server training on the pool (reference ``epoch_global``): ``train_epochs`` of SGD (DSA; the lr over the
        epochs by ``train_schedule``) for the global model, and for the surrogate if it is another model, each from
        its current weights; name -> mean loss."""
        aug = DSA(self.dsa_strategy, siamese=False) if self.train_dsa and parse_strategy(self.dsa_strategy) else None
        targets = [("global", self.model)] + ([("surrogate", self.surrogate)] if self.surrogate is not self.model else [])
        train_loss = {}
        for name, m in targets:
            opt = torch.optim.SGD(m.parameters(), lr=self.train_lr, momentum=self.train_momentum,
                                  weight_decay=self.train_weight_decay)
            train_loss[name] = fit_on_set(m, self.pool.images, self.pool.labels, opt, epochs=self.train_epochs,
                                          batch_size=self.train_batch, augment=aug,
                                          generator=torch_generator(self.ctx.config.seed, "feddgm", "train", rnd, name),
                                          on_epoch=schedule_lr(opt, self.train_schedule, self.train_epochs),
                                          engine=self.train_engine)
        return train_loss

    def attach_runner(self, client_map: Callable[[Callable, Sequence[tuple]], list]) -> None:
        """Run the looped per-client distillation through a parallel backend's ``client_map``."""
        self.distill_map = client_map

    def distill_client(self, rnd: int, upload: Upload) -> DistilledSet:
        """The server distillation of one client on its own (a :attr:`distill_map` job): the same distiller,
        seeds and iterations as the loop over all clients, so the same numbers. In a :meth:`worker_view` the
        generator is loaded here, by name, once per process (:func:`worker_generator`)."""
        if self.G is None and getattr(self, "_g_by_name", None) is not None:
            self.G = worker_generator(self._g_by_name, self.ctx.device, self.generator_sha256)
        d = self.make_distillers(rnd, [upload])[0]
        runs, _ = distill_clients([d], [upload.client_id], self.iterations, batched=False, progress=False)
        return harvest(d, runs[0], self._pixel)

    def worker_view(self) -> "FedDGM":
        """What a parallel runner ships to its workers for :meth:`client_update` / :meth:`distill_client`: a
        shallow copy without the pool, round log, global model (unless it is the surrogate), flat-parameter helper,
        sent payload and runner hook; it keeps :attr:`carry` (``warm_start``'s previous sets, as small as a pool).
        A generator loaded by name goes by name (each worker loads it once and checks its sha256; on a cluster the
        name must resolve on every node); a generator object set in a program goes as it is."""
        v = copy.copy(self)
        d = v.__dict__
        d.pop("distill_map", None)
        d.update(pool=None, round_log=[], _sent=None, flat=None)
        if getattr(self, "surrogate", None) is not getattr(self, "model", None):
            d["model"] = None
        src = getattr(self, "_g_source", None)
        d["_g_source"] = None
        if self.__dict__.get("G") is not None and src is not None and src[1] is self.G:
            d["G"], d["_g_by_name"] = None, src[0]
        return v

    # -- artefacts -------------------------------------------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"method": self.name, "options": self.options(), "surrogate": self.surrogate_spec,
                "model": ctx.config.model, "clients": ctx.config.clients, "partition": ctx.config.partition,
                "alpha": ctx.config.alpha, "rounds_done": self.round_log[-1]["round"] if self.round_log else 0}

    def save_distilled(self, path: str | os.PathLike, uint8: bool = False) -> Path | None:
        """Write the current pool as a distilled set (:mod:`fedlatent.export`); None when there is no pool."""
        from ...export import save_distilled

        if self.pool is None:
            return None
        ctx, p = self.ctx, self.pool
        return save_distilled(path, p.images, p.labels, dataset=self.dataset or "",
                              class_names=ctx.class_names, mean=ctx.mean, std=ctx.std,
                              generator=self.generator_name if self.G is not None else None,
                              generator_sha256=self.generator_sha256, latent_space=self.space, ipc=self.ipc,
                              seed=ctx.config.seed, clients=p.clients, rounds=p.rounds,
                              latents={"ws": p.ws, "f_k": p.f_k}, extra=self.export_metadata(), uint8=uint8)

    def save_round(self, folder: str | os.PathLike, rnd: int) -> None:
        folder = Path(folder)
        self.save_distilled(folder / DISTILLED_FILE)
        cur, mask = self.pool, self.pool.rounds == rnd
        classes = class_indices(cur.labels)
        save_class_grid(folder / GRID_PATTERN.format(r=rnd), cur.images[mask], classes[mask], cur.clients[mask],
                        self.ctx.mean, self.ctx.std, self.ctx.class_names,
                        title=f"{self.label} round {rnd}: distilled images per class ({self.space}; "
                              "columns ordered by client)")

    # -- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st: dict[str, Any] = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                              "pool": None if self.pool is None else self.pool.state(),
                              "round_log": copy.deepcopy(self.round_log)}
        if self.carry:  # warm_start: each client's last set and its chain's rounds
            st["carry"] = {str(c): {k: ({str(r): o for r, o in v.items()} if k == "origins" else v)
                                    for k, v in e.items() if v is not None} for c, e in self.carry.items()}
        if self.surrogate is not self.model:
            st["surrogate"] = {k: v.detach().clone() for k, v in self.surrogate.state_dict().items()}
        return st

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.surrogate is not self.model:
            if "surrogate" not in state:
                raise FedLatentError(f"{self.name}: checkpoint has no surrogate state but the run uses a separate "
                                     "surrogate")
            self.surrogate.load_state_dict(state["surrogate"])
        self.pool = Pool.from_state(state.get("pool"))
        self.round_log = list(state.get("round_log") or [])
        self.carry = {int(c): {"origin": int(e["origin"]), "labels": e["labels"].clone(), "ws": e.get("ws"),
                               "f_k": e.get("f_k"), "images": e.get("images"),
                               "origins": {int(r): int(o) for r, o in e["origins"].items()}}
                      for c, e in (state.get("carry") or {}).items()}
        self._sent = None


__all__ = ["FedDGM", "FedDGMConfig", "Pool", "DistilledSet", "harvest"]
