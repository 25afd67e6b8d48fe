"""FedDGM's ``warm_start``: each client's set starts where its previous set ended (beyond the reference)."""
from __future__ import annotations

import pytest
import torch

TINY = dict(clients=3, participation=1.0, rounds=3, local_epochs=1, batch_size=64, model="convnet:width=8", seed=5)
OPTS = dict(generator="digits", surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2, train_epochs=1,
            progress=False, save_artifacts=False)


def _run(digits16, rounds=3, **kw):
    from fedlatent.fl.base import FLConfig, get_method
    from fedlatent.fl.simulation import run_simulation

    s = get_method("feddgm")(**{**OPTS, **kw})
    return s, run_simulation(s, digits16, FLConfig(**{**TINY, "rounds": rounds}), progress=False)


def _record_starts(s):
    """Wrap ``make_distillers`` to keep, per round, each distiller's starting f_k and labels."""
    starts, orig = {}, s.make_distillers

    def spy(rnd, uploads):
        ds = orig(rnd, uploads)
        starts[rnd] = {u.client_id: (d.synthetic.f.detach().clone(), d.labels.detach().clone())
                       for u, d in zip(uploads, ds)}
        return ds

    s.make_distillers = spy
    return starts


def test_each_round_starts_at_the_clients_previous_set(digits16):
    """Round r's distillation of client c starts at exactly the f_k that round r-1 distilled for c (the pool's
    rows of c), and round 1 at the fresh seeded draw; without warm_start every round is the fresh draw."""
    from fedlatent.fl.base import FLConfig, get_method
    from fedlatent.fl.simulation import run_simulation

    for warm in (True, False):
        s = get_method("feddgm")(**OPTS, warm_start=warm, pool="all")
        starts = _record_starts(s)
        run_simulation(s, digits16, FLConfig(**TINY), progress=False)
        for rnd in (1, 2, 3):
            for cid, (f, y) in starts[rnd].items():
                fresh = s.initial_synthetic(rnd, cid)[0].f.detach()
                rows = (s.pool.rounds == rnd - 1) & (s.pool.clients == cid)
                expect = s.pool.f_k[rows] if warm and rnd > 1 else fresh
                assert torch.equal(f.cpu(), expect.cpu()), (warm, rnd, cid)
                assert not (warm and rnd > 1) or not torch.equal(f.cpu(), fresh.cpu())  # it is not the fresh draw
                assert torch.equal(y.cpu(), torch.arange(10))
        assert bool(s.carry) == warm
        if warm:  # every chain began in round 1
            assert all(e["origins"] == {1: 1, 2: 1, 3: 1} for e in s.carry.values())
            assert {s.origin_round(3, c) for c in range(3)} == {1}
        assert s.origin_round(3, 0) == (1 if warm else 3)


def test_premise_compares_with_the_chains_fresh_start(digits16):
    """Under warm_start the premise's (b) is the generator's samples at the draw each chain began from (round 1),
    re-created bit for bit: with no MTT iteration nothing moves, so the last pool equals round 1's fresh sets."""
    from fedlatent.apps.premise import initial_pool

    s, _ = _run(digits16, warm_start=True, iterations=0)
    x0, y0, w0, f0 = initial_pool(s)
    assert s.pool.rounds.unique().tolist() == [3]
    assert torch.equal(x0, s.pool.images) and torch.equal(f0, s.pool.f_k) and torch.equal(w0, s.pool.ws)
    first = torch.cat([s.initial_synthetic(1, c)[0].render() for c in range(3)])
    third = torch.cat([s.initial_synthetic(3, c)[0].render() for c in range(3)])
    assert torch.equal(x0, first) and not torch.equal(x0, third)


def test_other_classes_start_a_new_chain(digits16):
    """A client whose set would hold other classes (classes="inferred") starts fresh, and its chain's origin is
    that round; with the same classes it continues."""
    s, _ = _run(digits16, warm_start=True, rounds=1)
    prev = s.carry[0]
    assert s._continued(0, None) is prev
    assert s._continued(0, torch.arange(10).flip(0)) is None  # other classes: a fresh start
    assert s._continued(7, None) is None  # a client never seen
    s.warm_start = False
    assert s._continued(0, None) is None


def test_warm_start_resumes_exactly(digits16, tmp_path):
    """The carried sets are part of the checkpoint: 2 rounds + resume to 3 give the 3-round run's bits."""
    from fedlatent.fl.checkpoint import load_checkpoint, make_checkpoint_fn, resume_state
    from fedlatent.fl.base import FLConfig, get_method
    from fedlatent.fl.simulation import run_simulation

    ref, _ = _run(digits16, warm_start=True)
    s = get_method("feddgm")(**OPTS, warm_start=True)
    run_simulation(s, digits16, FLConfig(**{**TINY, "rounds": 2}), progress=False, out_dir=tmp_path, overwrite=True,
                   checkpoint_fn=make_checkpoint_fn(tmp_path))
    again = get_method("feddgm")(**OPTS, warm_start=True)
    run_simulation(again, digits16, FLConfig(**TINY), progress=False, out_dir=tmp_path, overwrite=True,
                   resume=resume_state(load_checkpoint(tmp_path)))
    assert torch.equal(again.pool.f_k, ref.pool.f_k) and torch.equal(again.pool.images, ref.pool.images)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), ref.model.state_dict().values()))
    assert again.carry.keys() == ref.carry.keys()
    assert all(again.carry[c]["origins"] == ref.carry[c]["origins"] for c in ref.carry)


def test_parallel_workers_continue_the_same_chains(digits16):
    """Through a parallel runner each job gets a pickled worker_view: it carries the previous sets, so the runner's
    pool equals the in-process loop's bit for bit."""
    import pickle

    from fedlatent.fl.base import FLConfig, get_method
    from fedlatent.fl.simulation import run_simulation

    def shipped(fn, jobs):  # what a process pool / Ray does: a lean copy of the strategy, pickled, per call
        view = pickle.loads(pickle.dumps(fn.__self__.worker_view()))
        return [getattr(view, fn.__name__)(*job) for job in jobs]

    loop, _ = _run(digits16, warm_start=True)
    par = get_method("feddgm")(**OPTS, warm_start=True)
    par.attach_runner(shipped)
    run_simulation(par, digits16, FLConfig(**TINY), progress=False)
    assert torch.equal(par.pool.f_k, loop.pool.f_k) and torch.equal(par.pool.images, loop.pool.images)
    fresh, _ = _run(digits16, warm_start=False)
    assert not torch.equal(fresh.pool.f_k, loop.pool.f_k)
