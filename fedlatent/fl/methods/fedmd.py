"""FedMD: heterogeneous federated learning via model distillation (Li & Wang, NeurIPS 2019 workshop).

Every party owns a model of its own architecture and keeps it for the whole run. Before round 1 each
party trains on the public LABELLED data, then on its private data ("transfer learning", Alg. 1 line 1).
Then, in each round (Alg. 1):

* Communicate: every party computes class scores f_k(x) (logits) on a public subset X_r (drawn per
  round from the stream (seed, "fedmd-subset", r)) and uploads them;
* Aggregate: the server computes the consensus  f~(x) = (1/m) sum_k f_k(x)  (:func:`consensus`);
* Distribute / Digest: each party trains its model to approach the consensus on X_r (L1 on the logits,
  as the paper's implementation; MSE optional; Adam lr 1e-3);
* Revisit: each party trains a few epochs on its private data.

Mapping onto the engine's one-exchange-per-round protocol: a party selected in round r first digests
the consensus of round r-1 (its payload; the client re-derives X_{r-1} from the seed), revisits its
private data, and uploads its scores on X_r. So the sequence pretrain, scores_1, consensus_1,
[digest, revisit, scores_2], consensus_2, ... is exactly the paper's loop; in round 1 nothing is digested
(there is no consensus yet) and the last consensus is computed but not digested.

Communication is counted honestly: uplink = the scores (|X_r| x classes float32), downlink = the
consensus (same size; nothing in round 1). Party models never travel. In simulation the parties'
weights are client-local state: they are created by :meth:`FedMD.client_init`, handed to
``client_update`` as ``data.state`` and returned in ``Upload.state`` (so ``client_update`` stays a pure
function of its arguments); the engine does not count or screen local state, and the strategy keeps
it only to stand in for the parties' devices and to evaluate the party models (headline accuracy =
mean over parties; ``accuracy_<arch>`` = mean over the parties of one architecture).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...utils import FedLatentError, numpy_rng, torch_generator
from ..base import ClientData, FLContext, Strategy, TensorDict, Upload, UploadSpec, register_method
from ..client import client_model, local_train
from ...train import fit
from ..options import make_config
from .feddf import model_logits


def public_subset(n_public: int, size: int, seed: int, rnd: int) -> torch.Tensor:
    """Sorted indices of round ``rnd``'s public subset X_r: ``min(size, n_public)`` samples without replacement."""
    if n_public < 1:
        raise FedLatentError("FedMD needs a non-empty public set")
    k = min(int(size), int(n_public))
    return torch.from_numpy(np.sort(numpy_rng(seed, "fedmd-subset", rnd).choice(n_public, size=k, replace=False)))


def consensus(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedMD's aggregate (Alg. 1, "Aggregate"): the mean of the parties' class scores, (1/m) sum_k f_k(X_r)."""
    if len(scores) == 0:
        raise FedLatentError("consensus: no scores")
    # float64 accumulation: the float32 result is the correctly rounded mean (up to ~1 ulp)
    return torch.stack([s.double() for s in scores]).mean(0).float()


def digest(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, epochs: int, lr: float = 1e-3,
           batch_size: int = 32, loss: str = "l1", generator: torch.Generator | None = None) -> dict[str, float]:
    """Fit ``model``'s logits on ``x`` to the consensus ``target`` (FedMD "Digest"); Adam(lr), L1 or MSE loss.

    Returns {"digest_loss": mean loss over the samples seen}.
    """
    fn = {"l1": F.l1_loss, "mse": F.mse_loss}.get(loss)
    if fn is None:
        raise FedLatentError(f"FedMD digest loss must be l1 or mse, got {loss!r}")
    n = int(x.shape[0])
    if epochs <= 0 or n == 0:
        return {"digest_loss": math.nan}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    acc = {"total": 0.0, "seen": 0}

    def log(val: torch.Tensor, nb: int) -> None:
        acc["total"] += float(val.detach()) * nb
        acc["seen"] += nb

    fit(model, x, target, opt, epochs=epochs, batch_size=batch_size, generator=generator,
        loss_fn=lambda m, xb, tb: fn(m(xb), tb), on_step=log)
    total, seen = acc["total"], acc["seen"]
    return {"digest_loss": total / seen}


@dataclass
class FedMDConfig:
    """Options of :class:`FedMD` (Li & Wang 2019, Alg. 1; see the module docstring for the mapping)."""

    subset_size: int = 500
    """Size of the public subset X_r drawn each round (stream (seed, "fedmd-subset", r)) for the class scores."""
    public_epochs: int = 2
    """Transfer learning, part 1: epochs on the public labelled data before round 1."""
    private_epochs: int = 1
    """Transfer learning, part 2: epochs on the private data before round 1."""
    digest_epochs: int = 1
    """Digest (Alg. 1): epochs of matching the consensus on X_r."""
    digest_lr: float = 1e-3
    """Adam learning rate of the digest."""
    digest_loss: str = "l1"
    """Digest loss on the logits: 'l1' (the paper's implementation, mean absolute error) or 'mse'."""
    revisit_epochs: int | None = None
    """Revisit: epochs on the private data after digesting (None: FLConfig.local_epochs)."""
    score_batch_size: int = 500
    """Batch size when a party computes its scores."""

    def __post_init__(self):
        if self.subset_size < 1 or self.score_batch_size < 1:
            raise FedLatentError("FedMD: subset_size and score_batch_size must be >= 1")
        if min(self.public_epochs, self.private_epochs, self.digest_epochs) < 0 or (
                self.revisit_epochs is not None and self.revisit_epochs < 0):
            raise FedLatentError("FedMD: epoch counts must be >= 0")
        if not self.digest_lr > 0:
            raise FedLatentError(f"FedMD: digest_lr must be > 0, got {self.digest_lr}")
        if self.digest_loss not in ("l1", "mse"):
            raise FedLatentError(f"FedMD: digest_loss must be l1 or mse, got {self.digest_loss!r}")
        self.subset_size, self.score_batch_size = int(self.subset_size), int(self.score_batch_size)
        self.public_epochs, self.private_epochs = int(self.public_epochs), int(self.private_epochs)
        self.digest_epochs, self.digest_lr = int(self.digest_epochs), float(self.digest_lr)
        self.revisit_epochs = None if self.revisit_epochs is None else int(self.revisit_epochs)


@register_method("fedmd")
class FedMD(Strategy):
    """FedMD with one persistent model per party (architectures from ``FLConfig.client_models``)."""

    heterogeneous = True
    config_class = FedMDConfig

    def __init__(self, config: FedMDConfig | None = None, **options):
        self.config = make_config(FedMDConfig, config, options)
        vars(self).update(dataclasses.asdict(self.config))

    # --- server side ----------------------------------------------------------------------------
    def setup(self, ctx: FLContext) -> None:
        super().setup(ctx)
        if ctx.public_x is None or len(ctx.public_x) == 0:
            raise FedLatentError("FedMD needs public labelled data: set --public-fraction (FLConfig.public_fraction) > 0")
        self.labels = {a: ctx.arch_label(a) for a in ctx.architectures}
        self.parties: dict[int, TensorDict] = {}   # the parties' own weights (client-local state)
        self.consensus: torch.Tensor | None = None
        self.consensus_round = -1

    def subset(self, rnd: int) -> torch.Tensor:
        return public_subset(len(self.ctx.public_x), self.subset_size, self.ctx.config.seed, rnd)

    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        # Only the previous round's consensus is digested (its subset X_{r-1} is known from the seed).
        if self.consensus is not None and self.consensus_round == rnd - 1:
            return {"consensus": self.consensus}
        return {}

    def expected_upload(self, client_id: int) -> UploadSpec:
        n = min(self.subset_size, len(self.ctx.public_x))
        return {"scores": ((n, self.ctx.num_classes), torch.float32)}

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        self.consensus = consensus([u.tensors["scores"] for u in uploads])
        self.consensus_round = rnd
        digests = [float(u.metrics["digest_loss"]) for u in uploads
                   if isinstance(u.metrics.get("digest_loss"), (int, float)) and math.isfinite(u.metrics["digest_loss"])]
        return {"digest_loss": sum(digests) / len(digests)} if digests else {}

    def client_state(self, client_id: int) -> TensorDict | None:
        return self.parties.get(client_id)

    def keep_client_state(self, client_id: int, state: TensorDict) -> None:
        self.parties[client_id] = state

    def party_model(self, client_id: int) -> nn.Module:
        m = client_model(self.ctx, self.ctx.arch_of(client_id))
        m.load_state_dict(self.parties[client_id])
        return m

    def eval_model(self) -> dict[str, list[nn.Module]]:
        groups: dict[str, list[nn.Module]] = {self.labels[a]: [] for a in self.ctx.architectures}
        for cid in sorted(self.parties):
            groups[self.labels[self.ctx.arch_of(cid)]].append(self.party_model(cid))
        return {k: v for k, v in groups.items() if v}

    def state_dict(self) -> dict:
        return {"parties": {c: {k: v.clone() for k, v in s.items()} for c, s in self.parties.items()},
                "consensus": self.consensus, "consensus_round": self.consensus_round}

    def load_state_dict(self, state: dict) -> None:
        self.parties = {int(c): dict(s) for c, s in state["parties"].items()}
        self.consensus, self.consensus_round = state["consensus"], int(state["consensus_round"])

    # --- party side (pure functions of their arguments) -------------------------------------------
    def _train(self, ctx: FLContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
               *keys: object) -> dict[str, float]:
        cfg = ctx.config
        return local_train(model, x, y, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, generator=torch_generator(cfg.seed, *keys))

    def pretrain(self, ctx: FLContext, client_id: int, data: ClientData) -> nn.Module:
        """A party's initial model: its own seeded init, trained on the public labelled set, then on its private data."""
        model = ctx.build_model(ctx.arch_of(client_id), key=("fedmd-party", client_id))
        self._train(ctx, model, ctx.public_x, ctx.public_y, self.public_epochs, "fedmd-public", client_id)
        self._train(ctx, model, data.x, data.y, self.private_epochs, "fedmd-private", client_id)
        return model

    def client_init(self, ctx: FLContext, client_id: int, data: ClientData) -> TensorDict:
        return {k: v.detach() for k, v in self.pretrain(ctx, client_id, data).state_dict().items()}

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict,
                      data: ClientData) -> Upload:
        if ctx.public_x is None:
            raise FedLatentError("FedMD needs public labelled data (ctx.public_x)")
        if data.state is None:  # a runner that skipped client_init: pre-train now
            model = self.pretrain(ctx, client_id, data)
        else:
            model = client_model(ctx, ctx.arch_of(client_id))
            model.load_state_dict(data.state)
        cfg = ctx.config
        metrics: dict[str, float] = {}
        if "consensus" in payload:  # Digest: approach the consensus of round r-1 on X_{r-1}
            idx = public_subset(len(ctx.public_x), self.subset_size, cfg.seed, rnd - 1).to(ctx.public_x.device)
            target = payload["consensus"].to(ctx.public_x.device)
            if target.shape != (len(idx), ctx.num_classes):
                raise FedLatentError(f"FedMD: consensus of shape {tuple(target.shape)} does not fit the public subset")
            metrics.update(digest(model, ctx.public_x.index_select(0, idx), target, epochs=self.digest_epochs,
                                  lr=self.digest_lr, batch_size=cfg.batch_size, loss=self.digest_loss,
                                  generator=torch_generator(cfg.seed, "fedmd-digest", rnd, client_id)))
        # Revisit: private epochs (the engine's local-training stream for this client and round).
        epochs = cfg.local_epochs if self.revisit_epochs is None else self.revisit_epochs
        metrics.update(self._train(ctx, model, data.x, data.y, epochs, "client", rnd, client_id))
        # Communicate: class scores on this round's public subset.
        idx = public_subset(len(ctx.public_x), self.subset_size, cfg.seed, rnd).to(ctx.public_x.device)
        scores = model_logits(model, ctx.public_x.index_select(0, idx), self.score_batch_size).float().contiguous()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return Upload(client_id=client_id, tensors={"scores": scores}, num_samples=len(data), metrics=metrics,
                      state=state)


__all__ = ["FedMDConfig", "public_subset", "consensus", "digest", "FedMD"]
