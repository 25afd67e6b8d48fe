"""FedMD: consensus, public subsets, digest, party state, byte accounting, end-to-end runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlatent.fl import FLConfig, run_simulation, simulate
from fedlatent.fl.base import ClientData
from fedlatent.fl.client import evaluate
from fedlatent.fl.feddf import model_logits
from fedlatent.fl.fedmd import FedMD, consensus, digest, public_subset
from fedlatent.fl.run import read_metrics
from fedlatent.models import get_model
from fedlatent.utils import FedLatentError

A, B = "convnet:width=8", "convnet:width=4,depth=2"
MIX = f"{A}@0.5;{B}@0.5"
S = 40  # public subset size


@pytest.fixture(scope="module")
def small(digits16):
    return dataclasses.replace(digits16, x_train=digits16.x_train[:400], y_train=digits16.y_train[:400],
                               x_test=digits16.x_test[:150], y_test=digits16.y_test[:150])


def _cfg(**kw):
    base = dict(clients=4, rounds=2, participation=1.0, model=A, client_models=MIX, public_fraction=0.2, alpha=1.0,
                min_size=5, batch_size=32, seed=2)
    base.update(kw)
    return FLConfig(**base)


def _fedmd(**kw):
    base = dict(subset_size=S, public_epochs=1, private_epochs=1, digest_epochs=1)
    base.update(kw)
    return FedMD(**base)


def test_consensus_is_the_mean_of_scores():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(7, 3, generator=g) for _ in range(3))
    assert torch.equal(consensus([a, b]), (a + b) / 2)
    torch.testing.assert_close(consensus([a, b, c]), (a.double() + b.double() + c.double()).div(3).float(),
                               rtol=0, atol=1e-7)
    assert torch.equal(consensus([a]), a)
    with pytest.raises(FedLatentError):
        consensus([])


def test_public_subset_seeded_per_round():
    s1 = public_subset(100, 30, seed=0, rnd=1)
    assert torch.equal(s1, public_subset(100, 30, seed=0, rnd=1))
    assert len(set(s1.tolist())) == 30 and int(s1.max()) < 100 and torch.equal(s1, s1.sort().values)
    assert not torch.equal(s1, public_subset(100, 30, seed=0, rnd=2))
    assert not torch.equal(s1, public_subset(100, 30, seed=1, rnd=1))
    assert torch.equal(public_subset(10, 30, seed=0, rnd=1), torch.arange(10))


def test_digest_fits_the_consensus():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    target = model_logits(get_model(A, 1, 10, 16), x) * 3
    m = get_model(B, 1, 10, 16)
    for loss, fn in (("l1", torch.nn.functional.l1_loss), ("mse", torch.nn.functional.mse_loss)):
        before = float(fn(model_logits(m, x), target))
        r = digest(m, x, target, epochs=15, lr=1e-2, batch_size=16, loss=loss, generator=torch.Generator().manual_seed(0))
        after = float(fn(model_logits(m, x), target))
        assert after < 0.6 * before and r["digest_loss"] > 0
    with pytest.raises(FedLatentError):
        digest(m, x, target, epochs=1, loss="huber")


def test_fedmd_needs_public_data(small):
    with pytest.raises(FedLatentError, match="public"):
        run_simulation(_fedmd(), small, _cfg(public_fraction=0.0, rounds=0), None, progress=False)


def test_fedmd_bytes_are_scores_and_consensus_and_columns_per_architecture(small, tmp_path):
    res = simulate(method="fedmd", data=small, out=tmp_path / "run", progress=False,
                   method_options=dict(subset_size=S, public_epochs=1, private_epochs=1), **_cfg().__dict__)
    rows = read_metrics(tmp_path / "run/metrics.csv")
    logits_bytes = S * 10 * 4  # float32 scores on the public subset
    assert [r["uplink_bytes"] for r in rows] == [0, 4 * logits_bytes, 4 * logits_bytes]
    assert [r["downlink_bytes"] for r in rows] == [0, 0, 4 * logits_bytes]  # no consensus before round 1
    st = res.strategy
    assert st.consensus.shape == (S, 10) and st.consensus_round == 2
    labels = {A: "convnet_width8", B: "convnet_width4_depth2"}
    # per-architecture accuracy = mean over that architecture's parties, headline = mean over all parties
    accs = {cid: evaluate(st.party_model(cid), small.x_test, small.y_test)["accuracy"] for cid in range(4)}
    for spec, lab in labels.items():
        mine = [accs[c] for c in range(4) if st.ctx.arch_of(c) == spec]
        assert rows[-1][f"accuracy_{lab}"] == pytest.approx(sum(mine) / len(mine))
    assert rows[-1]["accuracy"] == pytest.approx(sum(accs.values()) / 4)
    assert res.final_by_model.keys() == set(labels.values())
    # the party models have their client's architecture
    for cid in range(4):
        want = get_model(st.ctx.arch_of(cid), 1, 10, 16).state_dict()
        assert {k: v.shape for k, v in st.parties[cid].items()} == {k: v.shape for k, v in want.items()}


def test_party_state_persists_and_client_update_is_pure(small):
    kept: dict[int, int] = {}

    class Spy(FedMD):
        def keep_client_state(self, client_id, state):
            kept[client_id] = kept.get(client_id, 0) + 1
            super().keep_client_state(client_id, state)

    res = run_simulation(Spy(subset_size=S, public_epochs=1), small, _cfg(rounds=1, participation=0.5), None,
                         progress=False)
    st, ctx = res.strategy, res.strategy.ctx
    selected = [int(c) for c in str(res.history[-1]["client_ids"]).split()]
    # every party was pre-trained once (client_init); the selected ones then stored their round-1 state
    assert kept == {c: 2 if c in selected else 1 for c in range(4)} and sorted(st.parties) == [0, 1, 2, 3]
    # the consensus of round 1 is the mean of the selected parties' scores on X_1
    x1 = ctx.public_x[public_subset(len(ctx.public_x), S, ctx.config.seed, 1)]
    scores = [model_logits(st.party_model(c), x1) for c in selected]
    assert not torch.allclose(scores[0], scores[1])
    # (the parties' models after round 1 produced exactly the uploaded scores)
    torch.testing.assert_close(st.consensus, torch.stack(scores).mean(0), rtol=0, atol=1e-6)
    # client_update: same inputs -> same upload, inputs untouched
    cid = selected[0]
    state = {k: v.clone() for k, v in st.parties[cid].items()}
    payload = {"consensus": st.consensus.clone()}
    data = ClientData(cid, ctx.public_x[:50], ctx.public_y[:50], state=state)
    u1 = st.client_update(ctx, 2, cid, payload, data)
    u2 = st.client_update(ctx, 2, cid, payload, data)
    assert torch.equal(u1.tensors["scores"], u2.tensors["scores"])
    assert all(torch.equal(state[k], st.parties[cid][k]) for k in state)  # the input state was not modified
    assert torch.equal(payload["consensus"], st.consensus)
    assert set(u1.tensors) == {"scores"} and u1.state is not None and "digest_loss" in u1.metrics
    assert any(not torch.equal(u1.state[k], state[k]) for k in state)  # digest + revisit changed the model


def test_fedmd_same_seed_same_history(small):
    def run():
        h = run_simulation(_fedmd(), small, _cfg(rounds=2, participation=0.5), None, progress=False).history
        return [{k: v for k, v in r.items() if k not in ("round_s", "wall_s")} for r in h]

    assert run() == run()
