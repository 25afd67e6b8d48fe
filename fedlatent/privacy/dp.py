"""Client-side differential privacy: every client's local training is DP-SGD (Opacus).

With ``FLConfig.dp`` on, :func:`fedlatent.fl.client.local_train` hands the local epochs to
:func:`dp_local_train`: Poisson-sampled mini-batches (sample rate q = 1 / ceil(n / B)), per-sample
gradients clipped to L2 norm ``dp_clip`` and Gaussian noise of standard deviation ``sigma * dp_clip``
added to their sum (Abadi et al. 2016, "Deep Learning with Differential Privacy", Alg. 1), through
Opacus's ``PrivacyEngine`` (well kept and audited; the per-sample gradient hooks and the Poisson loader
are not worth re-writing).

Accounting (Rényi DP of the subsampled Gaussian mechanism, Mironov 2017 / Mironov et al. 2019, Opacus's
``RDPAccountant``) is per client: client c with n_c samples takes ``E * ceil(n_c / B)`` steps in each
round it is scheduled in, and its uploads over the run compose (adaptively: the global model it starts
from depends only on the other clients' data and on its own earlier, already accounted, uploads). The
guarantee is *example-level* with respect to that client's local data set (add/remove one training
example): the uploaded parameters of client c are (eps_c, delta)-DP, and everything the server computes
from them - aggregates, FedDGM's distilled sets, DynaFed's pseudo set, the global model - inherits the
same guarantee by post-processing. Because every training example lives on exactly one client, the whole
run is (max_c eps_c, delta)-DP for any single example (parallel composition over disjoint data).

It does not cover: the number of samples a client reports (``num_samples``) and the local metrics it
returns (``train_loss``), which are released in clear; whether a client took part (user-level DP, hiding a
whole client, needs clipping and noising of whole updates on the server, DP-FedAvg, and is not what this
does); the public split and the central test set; any data a method's clients use outside
``local_train`` (methods whose clients do not train through it refuse ``dp``).

``dp_noise`` fixes the noise multiplier sigma; ``dp_epsilon`` instead calibrates sigma per client so that
client's *total* epsilon over all rounds it is scheduled in equals the target
(``opacus.accountants.utils.get_noise_multiplier``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import FedLatentError

ACCOUNTANT = "rdp"


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise FedLatentError("dp needs Opacus: pip install 'fedlatent[privacy]' (or pip install opacus)") from None
    return opacus


@dataclass(frozen=True)
class ClientPrivacy:
    """The DP-SGD settings of one client for the whole run (sigma already calibrated)."""

    client_id: int
    noise_multiplier: float   # sigma: noise std / clip
    max_grad_norm: float      # per-sample clip C
    delta: float
    sample_rate: float        # q = 1 / steps_per_epoch
    steps_per_round: int      # local_epochs * ceil(n / B)
    rounds_planned: int       # rounds of the schedule this client is in


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Opacus's Poisson loader runs len(DataLoader) = ceil(n / B) steps per epoch at rate q = 1 / that."""
    return max(1, math.ceil(n / batch_size))


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """epsilon at ``delta`` of the composition of ``history`` [(sigma, q, steps), ...] (Opacus RDP accountant)."""
    _opacus()
    from opacus.accountants import RDPAccountant

    if not history or all(s == 0 for _, _, s in history):
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


def participations(cfg: Any, client_id: int, upto: int | None = None) -> int:
    """How many of rounds 1..upto (default: all) of the engine's schedule include ``client_id``."""
    from ..fl.schedule import client_schedule

    sched = client_schedule(cfg.clients, cfg.rounds, cfg.participation, cfg.seed)
    upto = cfg.rounds if upto is None else min(upto, cfg.rounds)
    return int(sum(int(client_id in s) for s in sched[:upto]))


@functools.lru_cache(maxsize=4096)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier reaching ``target_epsilon`` at ``delta`` after ``steps`` steps at rate q (Opacus)."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=ACCOUNTANT, epsilon_tolerance=0.005))


def client_privacy(ctx: Any, client_id: int) -> ClientPrivacy | None:
    """The DP-SGD settings of ``client_id`` in the run described by ``ctx`` (an FLContext); None without dp."""
    cfg = ctx.config
    if not getattr(cfg, "dp", False):
        return None
    _opacus()
    n = int(ctx.client_sizes[client_id])
    spe = steps_per_epoch(n, cfg.batch_size)
    q = 1.0 / spe
    steps = cfg.local_epochs * spe
    planned = participations(cfg, client_id)
    if cfg.dp_noise is not None:
        sigma = float(cfg.dp_noise)
    else:  # a client that never trains releases nothing: its sigma is irrelevant
        total = steps * planned
        sigma = calibrate(float(cfg.dp_epsilon), float(cfg.dp_delta), q, total) if total else 0.0
    return ClientPrivacy(client_id, sigma, float(cfg.dp_clip), float(cfg.dp_delta), q, steps, planned)


def client_epsilon(cfg: Any, client_sizes: Sequence[int], client_id: int, upto: int) -> float:
    """Cumulative epsilon of ``client_id`` after rounds 1..``upto`` of the schedule (at ``cfg.dp_delta``)."""
    from types import SimpleNamespace

    p = client_privacy(SimpleNamespace(config=cfg, client_sizes=list(client_sizes)), client_id)
    k = participations(cfg, client_id, upto)
    return epsilon([(p.noise_multiplier, p.sample_rate, p.steps_per_round * k)], p.delta)


def round_columns(cfg: Any, client_sizes: Sequence[int], rnd: int, uploads: Sequence[Any] = ()) -> dict[str, float]:
    """metrics.csv columns of round ``rnd`` under dp: ``dp_epsilon_c{c}`` (cumulative, every client) and
    ``dp_epsilon_max``, plus ``dp_sigma_max``. {} without dp.

    Counts every scheduled participation as spent (an upload the server rejects was still released).
    Raises FedLatentError when an upload was not trained through DP-SGD (a method whose clients bypass
    ``local_train``) or took a different number of steps than accounted.
    """
    if not getattr(cfg, "dp", False):
        return {}
    from types import SimpleNamespace

    ctx = SimpleNamespace(config=cfg, client_sizes=list(client_sizes))
    for u in uploads:
        m = getattr(u, "metrics", {}) or {}
        if "dp_steps" not in m:
            raise FedLatentError("dp: this method's clients do not train through DP-SGD (fedlatent.fl.client."
                                 "local_train); dp supports fedavg, fedprox, feddf, dynafed, feddgm and feddgm+avg")
        want = client_privacy(ctx, u.client_id).steps_per_round
        if int(m["dp_steps"]) != want:
            raise FedLatentError(f"dp: client {u.client_id} took {int(m['dp_steps'])} DP-SGD steps, {want} accounted")
    row: dict[str, float] = {}
    sigmas = []
    for c in range(cfg.clients):
        p = client_privacy(ctx, c)
        k = participations(cfg, c, rnd)
        row[f"dp_epsilon_c{c}"] = epsilon([(p.noise_multiplier, p.sample_rate, p.steps_per_round * k)], p.delta)
        sigmas.append(p.noise_multiplier)
    row = {"dp_epsilon_max": max(row.values()), "dp_sigma_max": max(sigmas), **row}
    return row


_FIX = ("use a model without batch norm (e.g. --model convnet, whose norm is instancenorm, or "
        "vgg11:norm=instancenorm / norm=none) or convert it with opacus.validators.ModuleValidator.fix "
        "(BatchNorm -> GroupNorm)")


def check_model(model: nn.Module) -> None:
    """One-line FedLatentError when Opacus cannot train ``model`` with per-sample gradients (e.g. BatchNorm)."""
    _opacus()
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        kinds = sorted({type(e).__name__ + ": " + str(e).splitlines()[0][:120] for e in errors})
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise FedLatentError(f"dp: {type(model).__name__} has BatchNorm layers, which DP-SGD cannot train "
                                 f"(per-sample gradients would mix samples); {_FIX}")
        raise FedLatentError(f"dp: Opacus cannot train {type(model).__name__} ({'; '.join(kinds)}); {_FIX}")


def dp_local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, privacy: ClientPrivacy, epochs: int,
                   lr: float, batch_size: int, generator: torch.Generator, momentum: float = 0.0,
                   weight_decay: float = 0.0, global_params: Mapping[str, torch.Tensor] | None = None,
                   mu: float = 0.0) -> dict[str, float]:
    """DP-SGD version of :func:`fedlatent.fl.client.local_train` (same arguments, trains ``model`` in place).

    Its own minibatch loop rather than :func:`fedlatent.train.fit`, on purpose: the privacy accounting (the
    subsampled Gaussian mechanism) assumes Poisson sampling - every example joins every batch independently with
    probability q, so batches vary in size and may be empty - while ``fit`` draws a fixed permutation per epoch
    and cuts it into equal batches; and a DP step is not ``zero_grad, backward, step`` but per-sample gradients,
    clipping and noise (Opacus's ``pre_step``), with FedProx's data-independent term added after the noise.

    Poisson batches and the noise come from two streams derived from ``generator``, so a run is reproducible.
    The FedProx term's gradient mu (w - w_g) does not depend on the data: it is added after clipping and
    noise (post-processing); weight decay likewise. Returns {"train_loss", "steps", "dp_steps", "dp_sigma",
    "dp_sample_rate", "dp_epsilon_round"} (the last: this round's epsilon alone, Opacus's accountant).
    """
    _opacus()
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    check_model(model)
    n = int(y.shape[0])
    seeds = torch.randint(0, 2**62, (2,), generator=generator).tolist()
    g_data = torch.Generator().manual_seed(int(seeds[0]))
    g_noise = torch.Generator(device=x.device).manual_seed(int(seeds[1]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, generator=g_data)
    if len(loader) != steps_per_epoch(n, batch_size):  # pragma: no cover - guards the accounting's assumption
        raise FedLatentError("dp: data loader length differs from the accounted steps per epoch")
    with _quiet():
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        hooks, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, noise_generator=g_noise, wrap_model=False)
    prox = None
    if mu > 0:
        if global_params is None:
            raise ValueError("dp_local_train: mu > 0 needs global_params")
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        prox = [(p, global_params[k].to(p.device)) for k, p in named]
    loss_sum, seen, steps = 0.0, 0, 0
    quiet = _quiet()
    quiet.__enter__()
    try:
        for _ in range(epochs):
            for xb, yb in dp_loader:
                dp_opt.zero_grad(set_to_none=True)
                if len(yb):
                    ce = F.cross_entropy(model(xb), yb)
                    ce.backward()
                    loss_sum += float(ce.detach()) * len(yb)
                    seen += len(yb)
                else:  # an empty Poisson batch: the update is pure noise (Opacus handles the empty grad_sample)
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                if dp_opt.pre_step():  # clip, sum, add noise, scale by 1 / expected batch size
                    if prox is not None:
                        with torch.no_grad():
                            for p, g in prox:
                                p.grad.add_(p.detach() - g, alpha=mu)
                    dp_opt.original_optimizer.step()
                steps += 1
    finally:
        quiet.__exit__(None, None, None)
        hooks.cleanup() if hasattr(hooks, "cleanup") else None
        for p in model.parameters():
            for a in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, a):
                    try:
                        delattr(p, a)
                    except AttributeError:
                        pass
    hist = list(engine.accountant.history)
    with _quiet():
        eps_round = float(engine.accountant.get_epsilon(delta=privacy.delta)) if hist else 0.0
    return {"train_loss": loss_sum / seen if seen else math.nan, "steps": float(steps), "dp_steps": float(steps),
            "dp_sigma": privacy.noise_multiplier, "dp_sample_rate": privacy.sample_rate,
            "dp_epsilon_round": eps_round}


class _quiet:
    """Silence Opacus's known warnings: secure RNG off (seeded noise is the point of a reproducible
    simulation), full backward hooks on inputs without grad, and the RDP order range."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        for msg in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the"):
            warnings.filterwarnings("ignore", message=msg)

    def __exit__(self, *a):
        self._w.__exit__(*a)


__all__ = ["ClientPrivacy", "client_privacy", "client_epsilon", "round_columns", "epsilon", "participations",
           "steps_per_epoch", "check_model", "dp_local_train"]
