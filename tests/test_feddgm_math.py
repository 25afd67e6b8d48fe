"""FedDGM's math: the latent meta-gradient against finite differences, and what ``pool="all"`` pools.

1. The server's latent trajectory matching (GLaD on MTT). For a set parameterised by generator latents
   (``f_k`` and the trainable w vectors ``ws[:, 1 + k:]`` in ``F_k``, or all of ``ws`` in ``W+``), the images are
   ``X = normalize(to_unit(G_{k..L}(f_k, ws)))`` (GLaD), the student starts at the client's ``start`` and takes
   ``N`` SGD steps ``theta_{n+1} = theta_n - alpha grad_theta CE(f(theta_n; X[b_n]), Y[b_n])`` (MTT eq. 1), and
   the loss is ``L = ||theta_N - end||^2 / ||start - end||^2`` (MTT eq. 2). The gradient FedDGM's distiller puts
   on the latents and on ``log alpha`` is checked against central finite differences of ``L`` evaluated by the
   test's own forward pass (generator primitives -> plain SGD steps written out here), in float64.
2. ``pool="all"``: after round r the server pool holds every round's distilled sets 1..r (the earlier ones kept,
   not recomputed) and the server trains on all of them; ``pool="round"`` holds round r's only.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

K, IPC, SIZE = 3, 2, 8  # classes, images per class, pixels
MEAN, STD = (0.3,), (0.4,)
GEN = "random:width=4,base=32,z_dim=8,w_dim=8,seed=1"  # an untrained built-in generator at 8 px (5 w vectors)


# -- 1. latent meta-gradient == finite differences ------------------------------------------------------------
def _latent_distiller(space: str, mode: str, soft: bool = False):
    """FedDGM's own distiller for one client (``make_distillers``), moved to float64, DSA off."""
    from fedlatent.fl.base import FLConfig, FLContext, Upload
    from fedlatent.fl.methods.feddgm import FedDGM
    from fedlatent.models.functional import FlatModel

    cfg = FLConfig(clients=1, model="convnet:width=4,depth=2", seed=0).check()
    ctx = FLContext(config=cfg, num_classes=K, channels=1, image_size=SIZE, class_names=[str(c) for c in range(K)],
                    client_sizes=[50], mean=MEAN, std=STD)
    s = FedDGM(generator=GEN, space=space, ipc=IPC, syn_steps=3, batch_syn=4, chunk_size=4, lr_teacher=0.1,
               dsa=False, mtt_mode=mode, surrogate="convnet:width=4,depth=2", progress=False, save_artifacts=False,
               soft_labels=soft, label_init=2.0)
    s.setup(ctx)
    s.G.module.double()
    s.surrogate.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the initialisation, so that norms and biases are generic
        for p in s.surrogate.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    start = FlatModel(s.surrogate).flatten()
    end = start + 0.05 * torch.randn(start.shape, generator=g, dtype=start.dtype)
    (d,) = s.make_distillers(1, [Upload(0, {"start": start, "end": end}, 50)])
    assert d.kernel_name == "convnet" and d.augment is None and d.config.mode == mode
    return d, start, end


def _matching_loss(d, latents: dict[str, torch.Tensor], log_lr: torch.Tensor, start, end, plan,
                   labels: torch.Tensor | None = None) -> float:
    """MTT eq. 2 after N steps of MTT eq. 1 on the images GLaD renders from ``latents``, written out here (soft
    labels: the cross-entropy against ``softmax(labels)``)."""
    labels = d.labels.detach() if labels is None else labels
    syn, G = d.synthetic, d.synthetic.G
    if syn.k == -1:  # W+: the whole synthesis
        img = G.synthesis(latents["ws"])
    else:  # F_k: layers k.. applied to f_k with the trainable w vectors
        img = G.from_f(latents["f"], latents["ws"], syn.k)
    x = ((img + 1) / 2 - MEAN[0]) / STD[0]  # [-1, 1] -> [0, 1] -> the student's normalised input
    model = d.flat.model
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    alpha = float(log_lr.exp())
    theta = start.clone()
    for st in plan:
        th = theta.clone().requires_grad_(True)
        params, i = {}, 0
        for n, sh in zip(names, shapes):
            params[n] = th[i: i + sh.numel()].view(sh)
            i += sh.numel()
        logits = functional_call(model, params, (x[st.indices],))
        y = labels[st.indices]
        loss = (-(torch.softmax(y, 1) * torch.log_softmax(logits, 1)).sum(1).mean() if y.is_floating_point()
                else F.cross_entropy(logits, y))
        (g,) = torch.autograd.grad(loss, th)
        theta = theta - alpha * g
    return float((theta - end).pow(2).sum() / (start - end).pow(2).sum())


@pytest.mark.parametrize("mode", ["exact", "unrolled"])
@pytest.mark.parametrize("space", ["F2", "F0", "W+"])
def test_latent_meta_gradient_matches_finite_differences(space, mode):
    """GLaD on MTT eqs. 1-2: d L / d f_k, d L / d ws and d L / d log alpha from FedDGM's distiller iteration
    (``Distiller.compute`` -> ``apply``: the adjoint meta-gradient on the images, then the chunked renderer's
    backward into the latents) equal central finite differences of the independently evaluated ``L`` along
    random unit directions, to 1e-6 relative (float64)."""
    from fedlatent.distill.mtt import make_plan
    from fedlatent.utils import derive_seed

    d, start, end = _latent_distiller(space, mode)
    syn = d.synthetic
    names = ["ws"] if syn.k == -1 else ["ws", "f"]
    at = {n: getattr(syn, n).detach().clone() for n in names}
    log_lr = d.log_lr.detach().clone()
    assert len(syn) == K * IPC and syn.chunk_size < len(syn)  # the renderer's backward runs in two chunks
    res = d.compute()
    d.apply(res)  # what FedDGM's loop does: the latents' .grad is this iteration's gradient, then SGD steps
    grads = {n: getattr(syn, n).grad.detach().clone() for n in names}
    grad_log_lr = float(d.log_lr.grad)
    plan = make_plan(len(syn), d.config.syn_steps, d.batch_syn, derive_seed(d.config.seed, "mtt-iter", 0),
                     augment=False)
    assert max(len(st.indices) for st in plan) == 4 < len(syn)  # minibatches: dX is accumulated over the steps

    def loss(lat=at, ll=log_lr):
        return _matching_loss(d, lat, ll, start, end, plan)

    assert res.loss == pytest.approx(loss(), rel=1e-12)  # the same L
    eps = 1e-5
    gen = torch.Generator().manual_seed(7)
    for n in names:
        for _ in range(2):
            u = torch.randn(at[n].shape, generator=gen, dtype=at[n].dtype)
            u /= u.norm()
            fd = (loss({**at, n: at[n] + eps * u}) - loss({**at, n: at[n] - eps * u})) / (2 * eps)
            an = float((grads[n] * u).sum())
            assert abs(fd) > 1e-6, (n, fd)  # a real derivative, not zeros on both sides
            assert an == pytest.approx(fd, rel=1e-6), (n, an, fd)
    fd = (loss(ll=log_lr + eps) - loss(ll=log_lr - eps)) / (2 * eps)
    assert abs(fd) > 1e-6 and grad_log_lr == pytest.approx(fd, rel=1e-6), (grad_log_lr, fd)


@pytest.mark.parametrize("mode", ["exact", "unrolled"])
def test_soft_label_gradient_matches_finite_differences(mode):
    """FedDGM's learned soft labels (``soft_labels=True``): the logits start at ``label_init * onehot`` and the
    gradient the distiller puts on them, d L / d Y of MTT eq. 2 through the soft cross-entropy of every student
    step, equals central finite differences of the independently evaluated ``L`` (float64); one SGD step of
    ``lr_label`` (momentum buffer empty) moves them by exactly ``-lr_label * grad``."""
    from fedlatent.distill.mtt import make_plan
    from fedlatent.utils import derive_seed

    d, start, end = _latent_distiller("F2", mode, soft=True)
    syn = d.synthetic
    assert d.soft and d.labels.shape == (K * IPC, K)
    y0 = d.labels.detach().clone()
    assert torch.equal(y0, 2.0 * F.one_hot(torch.arange(K).repeat_interleave(IPC), K).to(y0))
    at = {n: getattr(syn, n).detach().clone() for n in ("ws", "f")}
    log_lr = d.log_lr.detach().clone()
    res = d.compute()
    d.apply(res)
    grad = d.labels.grad.detach().clone()
    assert torch.allclose(d.labels.detach(), y0 - d.config.lr_label * grad, rtol=0, atol=1e-12)
    plan = make_plan(len(syn), d.config.syn_steps, d.batch_syn, derive_seed(d.config.seed, "mtt-iter", 0),
                     augment=False)

    def loss(y):
        return _matching_loss(d, at, log_lr, start, end, plan, labels=y)

    assert res.loss == pytest.approx(loss(y0), rel=1e-12)
    eps, gen = 1e-5, torch.Generator().manual_seed(3)
    for _ in range(3):
        u = torch.randn(y0.shape, generator=gen, dtype=y0.dtype)
        u /= u.norm()
        fd = (loss(y0 + eps * u) - loss(y0 - eps * u)) / (2 * eps)
        assert abs(fd) > 1e-7 and float((grad * u).sum()) == pytest.approx(fd, rel=1e-6), fd


# -- 2. pool="all" accumulates the rounds' distilled sets ----------------------------------------------------
CLIENTS, ROUNDS = 2, 3
PER_ROUND = CLIENTS * 1 * 10  # clients x ipc x classes (digits)


def _run_pool(data, pool: str, monkeypatch) -> tuple[dict, list, list]:
    """A 3-round FedDGM run through the simulation engine: the pool after every round (copied by the engine's
    per-round checkpoint hook), what each round's server training was given, and the metrics rows."""
    from fedlatent.fl.base import FLConfig
    from fedlatent.fl.methods import feddgm
    from fedlatent.fl.simulation import run_simulation
    from fedlatent.train import fit_on_set as fit

    trained: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def spy(model, x, y, opt, **kw):  # the server training's data, as fit_on_set receives them
        trained.append((len(pools) + 1, x.detach().clone(), y.detach().clone()))
        return fit(model, x, y, opt, **kw)

    monkeypatch.setattr(feddgm, "fit_on_set", spy)
    pools: dict[int, dict] = {}
    cfg = FLConfig(clients=CLIENTS, participation=1.0, rounds=ROUNDS, partition="iid", local_epochs=1, batch_size=64,
                   model="convnet:width=4", seed=3)
    s = feddgm.FedDGM(generator="random:width=4,base=32,z_dim=8,w_dim=8", space="F1", ipc=1, iterations=1,
                      syn_steps=2, surrogate="convnet:width=4", train_epochs=1, pool=pool, progress=False,
                      save_artifacts=False)
    res = run_simulation(s, data, cfg, progress=False,
                         checkpoint_fn=lambda rnd, st, _: pools.__setitem__(rnd, {k: v.clone() for k, v in
                                                                                  st.pool.state().items()}))
    return pools, trained, res.history


def test_pool_all_keeps_every_round_and_the_server_trains_on_it(digits16, monkeypatch):
    """FedDGM step 3 with ``pool="all"``: after round r the pool is the concatenation of the distilled sets of
    rounds 1..r (r x clients x ipc x classes images; the earlier rounds' images identical to what they were when
    distilled) and round r's server training gets exactly that pool; with ``pool="round"`` the pool and the
    training set are round r's sets only. One seed: both runs distil identical sets in rounds 1 and 2 (their
    round-1 trainings coincide), so the accumulated pool of round 2 is round 1's set followed by round 2's, and
    from round 3 on the runs differ (the bigger pool trained another model)."""
    data = dataclasses.replace(digits16, x_train=digits16.x_train[:300], y_train=digits16.y_train[:300],
                               x_test=digits16.x_test[:100], y_test=digits16.y_test[:100])
    p_all, t_all, h_all = _run_pool(data, "all", monkeypatch)
    p_rnd, t_rnd, h_rnd = _run_pool(data, "round", monkeypatch)
    assert sorted(p_all) == sorted(p_rnd) == list(range(1, ROUNDS + 1))
    for r in range(1, ROUNDS + 1):
        a, o = p_all[r], p_rnd[r]
        # 'round': this round's sets only, every client once per class
        assert o["images"].shape[0] == PER_ROUND and set(o["rounds"].tolist()) == {r}
        assert sorted(o["clients"].tolist()) == sorted(list(range(CLIENTS)) * 10)
        # 'all': every round 1..r, the earlier ones kept as they were
        assert a["images"].shape == (r * PER_ROUND, *o["images"].shape[1:])
        assert sorted(a["rounds"].tolist()) == [j for j in range(1, r + 1) for _ in range(PER_ROUND)]
        for j in range(1, r):
            rows = a["rounds"] == j
            for key in ("images", "labels", "clients", "ws", "f_k"):
                assert torch.equal(a[key][rows], p_all[j][key][p_all[j]["rounds"] == j]), (r, j, key)
        # the round's server training saw exactly this pool; the metrics say how big it was
        for pools, trained, hist in ((p_all, t_all, h_all), (p_rnd, t_rnd, h_rnd)):
            (x, y), = [(x, y) for rr, x, y in trained if rr == r]  # one call: the surrogate is the global model
            assert torch.equal(x, pools[r]["images"].to(x)) and torch.equal(y, pools[r]["labels"])
            assert next(row for row in hist if row["round"] == r)["pool_size"] == len(pools[r]["images"])
    # same seed: rounds 1-2 distil the same sets in both modes, so all's round-2 pool = round 1's + round 2's set
    for key in ("images", "labels", "clients", "ws", "f_k"):
        assert torch.equal(p_all[1][key], p_rnd[1][key])
        for j in (1, 2):
            assert torch.equal(p_all[2][key][p_all[2]["rounds"] == j], p_rnd[j][key]), (j, key)
    # round 2 trained on 40 images instead of 20, so round 3's download and distilled sets differ
    assert not torch.equal(p_all[3]["images"][p_all[3]["rounds"] == 3], p_rnd[3]["images"])
