"""The premise check of a FedDGM run (fedlatent.apps.premise) and the centralised upper bound
(fedlatent.fl.centralised)."""
from __future__ import annotations

import json

import pytest
import torch

TINY = dict(clients=2, participation=1.0, rounds=2, local_epochs=1, batch_size=64, model="convnet:width=8",
            surrogate="convnet:width=8", ipc=1, syn_steps=2, train_epochs=1, seed=3)


def _run(digits16, iterations: int, **kw):
    from fedlatent.fl.simulation import simulate

    opts = {k: TINY[k] for k in ("surrogate", "ipc", "syn_steps", "train_epochs")}
    cfg = {k: v for k, v in TINY.items() if k not in opts}
    return simulate("feddgm", data=digits16, progress=False,
                    method_options=dict(opts, generator="digits", iterations=iterations, progress=False,
                                        save_artifacts=False, **kw), **cfg).strategy


def test_initial_pool_is_the_distillations_starting_point(digits16):
    """With no MTT iteration the pool *is* its initialisation: the re-created initial sets equal it bit for bit
    (same seeds, same order), the latents moved by 0, and (a) and (b) train identical networks."""
    from fedlatent.apps.premise import initial_pool, premise_check

    s = _run(digits16, iterations=0)
    x0, y0, w0, f0 = initial_pool(s)
    assert torch.equal(x0, s.pool.images) and torch.equal(y0, s.pool.labels)
    assert torch.equal(w0, s.pool.ws) and torch.equal(f0, s.pool.f_k)
    p = premise_check(s, digits16, epochs=2, seeds=(0,), real=False)
    assert p.f_move == 0.0 and p.w_move == 0.0 and p.real is None
    assert p.distilled["accs"] == p.initial["accs"] and not p.holds  # equal is not better


def test_inferred_classes_reach_the_pool_and_the_premise(digits16):
    """classes='inferred': each client's ipc * 10 images are spread over the classes its upload raised (here, with a
    Dirichlet 0.01 split, far fewer than 10), and the premise check re-creates those sets bit for bit."""
    from fedlatent.apps.premise import initial_pool

    from fedlatent.fl.simulation import simulate

    cfg = {k: v for k, v in TINY.items() if k not in ("surrogate", "ipc", "syn_steps", "train_epochs")}
    s = simulate("feddgm", data=digits16, progress=False, partition="dirichlet", alpha=0.01,
                 method_options=dict(generator="digits", surrogate=TINY["surrogate"], ipc=2, iterations=0, syn_steps=2,
                                     train_epochs=1, classes="inferred", progress=False, save_artifacts=False),
                 **cfg).strategy
    x0, y0, _, _ = initial_pool(s)
    assert torch.equal(x0, s.pool.images) and torch.equal(y0, s.pool.labels)
    for cid in s.pool.clients.unique():
        y = s.pool.labels[s.pool.clients == cid]
        assert len(y) == 20 and len(y.unique()) < 10  # the whole budget, over fewer classes


def test_premise_check_after_distillation(digits16):
    """After MTT the pool differs from its start: the movement is ||f_T - f_0|| / ||f_0|| recomputed here, the
    real subset has the pool's size and class balance, and the markdown states the verdict."""
    from fedlatent.apps.premise import initial_pool, premise_check

    s = _run(digits16, iterations=2)
    _, _, _, f0 = initial_pool(s)
    p = premise_check(s, digits16, epochs=2, seeds=(0, 1))
    expect = float((s.pool.f_k.double() - f0.double()).norm() / f0.double().norm())
    assert p.f_move == pytest.approx(expect, rel=1e-9) and p.f_move > 0
    assert p.n_images == len(s.pool.images) == 2 * 10 and len(p.distilled["accs"]) == 2
    assert p.loss_first == pytest.approx(sum(s.round_log[-1]["loss_first"]) / 2)
    md = p.markdown()
    assert "(a) distilled pool" in md and "(b) generator samples" in md and "(c) random real subset" in md
    assert ("holds" in md) == p.holds and json.dumps(p.as_dict())


def test_soft_labels_reach_the_pool_and_the_server(digits16):
    """soft_labels=True: the pool holds learned [N, K] logits (started at label_init * onehot, moved by MTT), the
    initial pool's labels are the hard classes, and the premise check trains on both."""
    from fedlatent.apps.premise import initial_pool, premise_check

    s = _run(digits16, iterations=2, soft_labels=True, label_init=3.0, lr_label=5.0)
    y = s.pool.labels
    assert y.is_floating_point() and y.shape == (20, 10)
    hard = torch.arange(10).repeat(2)
    assert not torch.equal(y, 3.0 * torch.nn.functional.one_hot(hard, 10).float())
    _, y0, _, _ = initial_pool(s)
    assert torch.equal(y0, hard)
    premise_check(s, digits16, epochs=1, seeds=(0,), real=False)


def test_distill_writes_the_premise_into_the_report(digits16, tmp_path):
    from fedlatent.apps.distill import distill_federated

    cfg = dict(TINY, iterations=1)
    res = distill_federated(data=digits16, out=tmp_path / "run", progress=False, baseline="none", premise_epochs=2,
                            exclude_public=False, **cfg)
    assert res.premise is not None and "premise" in next(iter(res.premise_info()))
    assert "## Premise check" in (tmp_path / "run" / "report.md").read_text()
    saved = json.loads((tmp_path / "run" / "premise.json").read_text())
    assert saved["n_images"] == 20 and saved["epochs"] == 2
    res0 = distill_federated(data=digits16, out=tmp_path / "run0", progress=False, baseline="none", premise_epochs=0,
                             exclude_public=False, **cfg)
    assert res0.premise is None and not (tmp_path / "run0" / "premise.json").exists()


def test_centralised_is_local_training_on_the_pooled_data(digits16):
    """The upper bound: the run's initial model, trained by the clients' local SGD on all the training data for
    rounds x local_epochs epochs, evaluated after every local_epochs epochs; recomputed independently."""
    from fedlatent.fl.base import FLConfig, FLContext
    from fedlatent.fl.centralised import centralised
    from fedlatent.fl.client import local_train
    from fedlatent.train import evaluate
    from fedlatent.utils import torch_generator

    cfg = FLConfig(clients=4, rounds=2, local_epochs=1, lr=0.05, momentum=0.5, batch_size=128,
                   model="convnet:width=8", seed=5)
    res = centralised(digits16, cfg)
    ctx = FLContext(config=cfg.check(), num_classes=10, channels=1, image_size=16, class_names=list(digits16.classes),
                    client_sizes=[len(digits16.y_train)], mean=tuple(digits16.mean), std=tuple(digits16.std))
    m, g = ctx.build_model(), torch_generator(5, "centralised")
    curve = []
    for r in (1, 2):
        local_train(m, digits16.x_train, digits16.y_train, epochs=1, lr=0.05, batch_size=128, generator=g,
                    momentum=0.5, weight_decay=cfg.weight_decay)
        curve.append((r, evaluate(m, digits16.x_test, digits16.y_test)["accuracy"]))
    assert res.curve == curve and res.final_accuracy == curve[-1][1] and res.epochs == 2
    assert centralised(digits16, cfg).curve == curve  # seeded
