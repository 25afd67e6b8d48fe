"""The contract between the simulation engine and a federated method.

One :class:`Strategy` subclass per method. A round of :func:`fedlatent.fl.simulation.run_simulation`:

1. the engine picks the round's clients from the pre-drawn schedule;
2. for each client: ``payload = strategy.client_payload(rnd, cid)`` (downlink, counted in bytes), then
   ``upload = strategy.client_update(ctx, rnd, cid, payload, data)`` (local work, uplink);
3. every upload is checked against ``strategy.expected_upload(cid)`` (:mod:`fedlatent.fl.validate`);
   bad ones are dropped with a logged reason;
4. ``strategy.aggregate(rnd, accepted)`` updates the server state (skipped when nothing was accepted,
   so the global state stays unchanged);
5. ``strategy.eval_model()`` is evaluated on the central test set every ``eval_every`` rounds.

Heterogeneous and stateful methods (FedDF, FedMD) use three optional extensions:

* per-client architectures: ``FLConfig.client_models`` (see :mod:`fedlatent.fl.hetero`) gives every
  client its own model spec, ``ctx.arch_of(cid)``; only strategies with ``heterogeneous = True``
  accept a mixed assignment;
* a public split: ``FLConfig.public_fraction`` > 0 holds out a seeded, stratified part of the training
  set (``ctx.public_x`` / ``ctx.public_y``) before the clients' partition is drawn (public and
  private data are disjoint);
* client-local state: ``client_init`` runs once per client before round 1 (e.g. FedMD pre-training) and
  may return state that lives ON the client; the engine hands it back as ``data.state`` whenever the
  client is selected, and a client returns its new state in ``Upload.state``. Local state is never
  transmitted: it is not counted in bytes and not screened. In simulation the strategy stores it
  (``client_state`` / ``keep_client_state``) so that it can also evaluate the clients' models.

``client_update`` must behave like a pure function of its arguments: it may read the strategy's
constructor hyper-parameters but never server state that ``aggregate`` changes, and it must not
modify ``payload`` in place. Then a client can run in another process (Ray, Flower) from pickled
arguments. :class:`FLContext` and :class:`ClientData` are plain picklable dataclasses for that reason.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..utils import FedLatentError, derive_seed

TensorDict = dict[str, torch.Tensor]
UploadSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class FLConfig:
    """All simulation options shared by every method (method hyper-parameters go to the Strategy).

    Defaults are the quick ``digits`` configuration of ``fedlatent simulate``.
    """

    clients: int = 10                 # number of clients K
    partition: str = "dirichlet"      # iid | dirichlet | balanced-dirichlet | pathological
    alpha: float = 0.5                # Dirichlet concentration (smaller = more heterogeneous)
    min_size: int = 10                # minimum samples per client (Dirichlet schemes)
    classes_per_client: int = 2       # pathological scheme
    rounds: int = 20                  # communication rounds T
    participation: float = 0.5        # fraction C of clients per round (at least one client)
    local_epochs: int = 1             # local epochs E
    lr: float = 0.01                  # local SGD learning rate
    momentum: float = 0.9             # local SGD momentum
    weight_decay: float = 5e-4        # local SGD weight decay
    batch_size: int = 32              # local mini-batch size B
    model: str = "convnet"            # fedlatent.models.get_model spec (ConvNet-D3 up to 32 px)
    eval_every: int = 1               # evaluate every k rounds (always at round 0 and the last round)
    eval_batch_size: int = 128        # central evaluation batch size (128: within a CPU core's caches; 1000 ran
    #                                   ConvNet-D3 evaluation 2.0x slower, memory-bound; benchmarks/eval_batch.py)
    seed: int = 0                     # fixes partition, schedule, init, local shuffling
    device: str = "cpu"               # cpu | cuda | cuda:N | auto
    # Upload screening (see fedlatent.fl.validate): an update whose L2 norm exceeds
    # norm_factor x the round's median update norm, or norm_cap, is rejected.
    norm_factor: float = 100.0
    norm_cap: float = 1e4
    # Heterogeneous clients (fedlatent.fl.hetero): "SPEC@FRACTION;..." or a JSON file {client_id: spec};
    # None = every client uses `model`.
    client_models: str | None = None
    # Seeded stratified public split of the training set, disjoint from the clients' data (FedDF transfer
    # set, FedMD public data); 0 = no public split.
    public_fraction: float = 0.0
    # Client-side DP-SGD (fedlatent.privacy.dp, Opacus): per-sample clip C, noise multiplier sigma or a target
    # epsilon per client over the whole run (sigma calibrated per client), delta.
    dp: bool = False
    dp_clip: float = 1.0
    dp_noise: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5

    def check(self) -> "FLConfig":
        """Raise FedLatentError on an invalid option; returns self."""
        def bad(msg: str) -> None:
            raise FedLatentError(msg)

        if self.clients < 1:
            bad(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 0:
            bad(f"rounds must be >= 0, got {self.rounds}")
        if not 0.0 < self.participation <= 1.0:
            bad(f"participation must be in (0, 1], got {self.participation}")
        if self.local_epochs < 0:
            bad(f"local_epochs must be >= 0, got {self.local_epochs}")
        if self.lr < 0 or self.momentum < 0 or self.weight_decay < 0:
            bad("lr, momentum and weight_decay must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            bad("batch sizes must be >= 1")
        if self.eval_every < 1:
            bad(f"eval_every must be >= 1, got {self.eval_every}")
        if self.alpha <= 0:
            bad(f"alpha must be > 0, got {self.alpha}")
        if self.min_size < 0 or self.classes_per_client < 1:
            bad("min_size must be >= 0 and classes_per_client >= 1")
        if not self.norm_factor > 1 or not self.norm_cap > 0:
            bad("norm_factor must be > 1 and norm_cap > 0")
        if not 0.0 <= self.public_fraction < 1.0:
            bad(f"public_fraction must be in [0, 1), got {self.public_fraction}")
        if not self.dp and (self.dp_noise is not None or self.dp_epsilon is not None):
            bad("dp_noise / dp_epsilon need dp (--dp)")
        if self.dp and (self.dp_noise is None) == (self.dp_epsilon is None):
            bad("dp needs exactly one of dp_noise (noise multiplier) and dp_epsilon (target epsilon)")
        if not self.dp_clip > 0 or not 0 < self.dp_delta < 1 or (self.dp_noise or 0) < 0 or (self.dp_epsilon or 1) <= 0:
            bad("dp_clip must be > 0, dp_delta in (0, 1), dp_noise >= 0 and dp_epsilon > 0")
        if self.client_models is not None and not str(self.client_models).strip():
            bad("client_models must not be empty (leave it unset for a homogeneous run)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FLContext:
    """What a method needs to know about the run; picklable (no open files, no models)."""

    config: FLConfig
    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    client_sizes: list[int]            # training samples per client (index = client id)
    device: str = "cpu"
    client_models: list[str] | None = None   # model spec per client (None: config.model for all)
    public_x: torch.Tensor | None = None     # public split (FLConfig.public_fraction > 0), on `device`
    public_y: torch.Tensor | None = None
    mean: tuple[float, ...] | None = None    # the dataset's normalisation (model input space)
    std: tuple[float, ...] | None = None
    run_dir: str | None = None                # the run folder (None: not writing one); for method artefacts
    dataset: str | None = None                # the data set's name (artefact metadata)

    def arch_of(self, client_id: int) -> str:
        """The model spec of client ``client_id``."""
        return self.config.model if self.client_models is None else self.client_models[client_id]

    @property
    def architectures(self) -> list[str]:
        """The distinct model specs of the run, in order of first use by client id."""
        return [self.config.model] if self.client_models is None else list(dict.fromkeys(self.client_models))

    def arch_label(self, spec: str) -> str:
        """A short column-safe name of ``spec`` (see :func:`fedlatent.fl.hetero.arch_labels`)."""
        from .hetero import arch_labels

        return arch_labels(self.architectures)[spec]

    def build_model(self, spec: str | None = None, key: object = "init") -> nn.Module:
        """A fresh model (``spec`` defaults to ``config.model``) on ``device``.

        Initialisation is seeded by (config.seed, key) on a forked RNG, so the global torch RNG is
        untouched and the same seed always yields the same initial weights.
        """
        from ..models import get_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "model", key))
            m = get_model(spec or self.config.model, self.channels, self.num_classes, self.image_size)
        return m.to(self.device)


@dataclass
class ClientData:
    """One client's local training data (already on the context's device)."""

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    state: TensorDict | None = None    # the client's local state (see Strategy.client_init), never transmitted

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Upload:
    """What a client sends back: named tensors (counted as uplink bytes), sample count, local metrics."""

    client_id: int
    tensors: TensorDict
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    state: TensorDict | None = None    # new local state kept by the client (not transmitted, not counted)


def tensor_bytes(tensors: TensorDict) -> int:
    """Bytes actually transmitted for a name->tensor dict (raw element bytes, no framing)."""
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


class Strategy:
    """Base class of a federated method. Subclasses set ``name`` and override the hooks below.

    Hyper-parameters are the fields of the method's ``config_class`` (a dataclass validated in its
    ``__post_init__``; see :mod:`fedlatent.fl.options`): ``Method(config)`` or ``Method(**options)``, stored
    as ``self.config``; :meth:`options` returns them for config.json.
    """

    name: ClassVar[str] = "base"
    heterogeneous: ClassVar[bool] = False   # True: accepts clients with different architectures
    config_class: ClassVar[type | None] = None  # the method's options dataclass (None: no options)
    ctx: FLContext

    def options(self) -> dict[str, Any]:
        """Method hyper-parameters (JSON-serialisable), recorded in config.json: the config's fields."""
        cfg = getattr(self, "config", None)
        return asdict(cfg) if cfg is not None and self.config_class is not None else {}

    def attach_runner(self, client_map: Callable[[Callable, Any], list]) -> None:
        """A parallel backend offers its ``client_map(fn, jobs)`` for independent per-client work on the server
        (FedDGM runs its per-client distillation through it); the default does not use it."""

    def setup(self, ctx: FLContext) -> None:
        """Called once before round 1: build server state (e.g. the initial global model)."""
        self.ctx = ctx

    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        """Downlink for ``client_id`` in round ``rnd`` (the engine counts its bytes)."""
        raise NotImplementedError

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict,
                      data: ClientData) -> Upload:
        """Local work of one client; a pure function of its arguments (see module docstring)."""
        raise NotImplementedError

    def expected_upload(self, client_id: int) -> UploadSpec:
        """name -> (shape, dtype) every upload of ``client_id`` must match exactly."""
        raise NotImplementedError

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float] | None:
        """Update the server state from the accepted uploads (never called with an empty list).

        May return extra scalar metrics for the round (written as metrics.csv columns).
        """
        raise NotImplementedError

    def eval_model(self) -> nn.Module | dict[str, nn.Module]:
        """The model evaluated on the central test set; a dict for heterogeneous methods."""
        raise NotImplementedError

    def client_init(self, ctx: FLContext, client_id: int, data: ClientData) -> TensorDict | None:
        """Optional client-side work before round 1 (pure, like client_update); returns the client's local state.

        The engine calls it for every client (in client-id order, through the client runner) only when
        a strategy overrides it, and stores a non-None result with :meth:`keep_client_state`.
        """
        return None

    def client_state(self, client_id: int) -> TensorDict | None:
        """The local state that lives on ``client_id`` (handed to client_update as ``data.state``)."""
        return None

    def keep_client_state(self, client_id: int, state: TensorDict) -> None:
        """Store the local state a client returned (from client_init or in ``Upload.state``)."""
        raise FedLatentError(f"method {self.name!r} has stateless clients, but client {client_id} returned local state")

    def state_dict(self) -> dict[str, Any]:
        """Server state for checkpoint/resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the server state written by :meth:`state_dict`."""


@dataclass
class ClientFailure:
    """What a parallel client runner (``client_map``) returns for a client whose work failed for good
    (e.g. after its retries on Ray): the engine logs and records it and goes on without that client."""

    client_id: int | None
    error: str
    attempts: int = 1



# ---------------------------------------------------------------------------------------------
# Method registry: modules in fedlatent.fl.methods register their Strategy with @register_method, and
# get_method() imports that package's modules on demand, so adding a method never edits this file.

METHODS: dict[str, type[Strategy]] = {}


def register_method(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in METHODS and METHODS[name] is not cls:
            raise FedLatentError(f"federated method {name!r} registered twice")
        METHODS[name] = cls
        cls.name = name
        return cls

    return deco


_BROKEN: dict[str, str] = {}


def _discover() -> None:
    """Import every public module of fedlatent.fl.methods (each registers its methods).

    A module that fails to import is logged and skipped, so one broken method never hides the others.
    """
    from .methods import __path__ as pkg_path

    for mod in pkgutil.iter_modules(pkg_path):
        if mod.name.startswith("_") or mod.name in _BROKEN:
            continue
        try:
            importlib.import_module(f"{__package__}.methods.{mod.name}")
        except Exception as e:  # noqa: BLE001 - reported below and in get_method's error
            _BROKEN[mod.name] = f"{type(e).__name__}: {e}"
            logging.getLogger(__name__).warning("fedlatent.fl.methods.%s failed to import: %s", mod.name, _BROKEN[mod.name])


def available_methods() -> list[str]:
    """Names of all registered federated methods."""
    _discover()
    return sorted(METHODS)


def get_method(name: str) -> type[Strategy]:
    """The Strategy class registered under ``name``."""
    if name not in METHODS:
        _discover()
    if name not in METHODS:
        broken = f" (modules that failed to import: {', '.join(sorted(_BROKEN))})" if _BROKEN else ""
        raise FedLatentError(f"unknown federated method {name!r}; choose one of {', '.join(sorted(METHODS))}{broken}")
    return METHODS[name]


__all__ = [
    "FLConfig", "FLContext", "ClientData", "Upload", "ClientFailure", "Strategy", "tensor_bytes", "METHODS",
    "register_method", "available_methods", "get_method",
]
