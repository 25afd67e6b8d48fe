"""FedAvg (McMahan et al., AISTATS 2017) and FedProx (Li et al., MLSys 2020).

FedAvg: each selected client starts from the global weights, runs E local epochs of SGD, uploads its
weights; the server replaces the global weights by the sample-weighted mean of the accepted uploads.
FedProx: the same, with the proximal term (mu/2)||w - w^t||^2 added to every local objective
(eq. 2 of the paper), which limits client drift on heterogeneous data. mu = 0 is exactly FedAvg.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...utils import FedLatentError
from ..aggregate import fedavg
from ..base import ClientData, FLContext, Strategy, TensorDict, Upload, UploadSpec, register_method
from ..client import train_client
from ..options import make_config


@register_method("fedavg")
class FedAvg(Strategy):
    """Weighted averaging of full client state_dicts (parameters and buffers), weights = n_k."""

    model: nn.Module

    def setup(self, ctx: FLContext) -> None:
        super().setup(ctx)
        self.model = ctx.build_model()

    def client_payload(self, rnd: int, client_id: int) -> TensorDict:
        # The global tensors themselves (read-only by contract): nothing is copied on the server.
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict,
                      data: ClientData) -> Upload:
        return train_client(ctx, rnd, payload, data)

    def expected_upload(self, client_id: int) -> UploadSpec:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}

    def aggregate(self, rnd: int, uploads: list[Upload]) -> dict[str, float]:
        new = fedavg([u.tensors for u in uploads], [u.num_samples for u in uploads])
        self.model.load_state_dict(new)
        return {}

    def eval_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


@dataclass
class FedProxConfig:
    """Options of :class:`FedProx`."""

    mu: float = 0.01
    """Proximal coefficient mu of (mu/2)||w - w^t||^2 added to every local objective (FedProx eq. 2; 0 = FedAvg)."""

    def __post_init__(self):
        if not self.mu >= 0:
            raise FedLatentError(f"FedProx mu must be >= 0, got {self.mu}")
        self.mu = float(self.mu)


@register_method("fedprox")
class FedProx(FedAvg):
    """FedAvg whose clients minimise F_k(w) + (mu/2)||w - w^t||^2 (FedProx eq. 2)."""

    config_class = FedProxConfig

    def __init__(self, config: FedProxConfig | None = None, **options):
        self.config = make_config(FedProxConfig, config, options)
        self.mu = self.config.mu

    def client_update(self, ctx: FLContext, rnd: int, client_id: int, payload: TensorDict,
                      data: ClientData) -> Upload:
        return train_client(ctx, rnd, payload, data, mu=self.mu)


__all__ = ["FedAvg", "FedProx", "FedProxConfig"]
