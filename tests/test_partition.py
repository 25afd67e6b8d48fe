"""Client partitioners: coverage, sizes, label skew as a function of alpha, determinism, errors."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from fedlatent.data.partition import (
    SCHEMES, balanced_dirichlet, dirichlet, iid, label_counts, partition, pathological, save_partition_report,
)
from fedlatent.utils import FedLatentError

C = 10
# 10 classes of unequal size (300..480), shuffled: 3900 samples.
_rng = np.random.default_rng(123)
Y = _rng.permutation(np.repeat(np.arange(C), 300 + 20 * np.arange(C)))
N = len(Y)


def _check_disjoint(parts, n, exact: bool):
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "a sample was given to two clients"
    assert allidx.min(initial=0) >= 0 and allidx.max(initial=0) < n
    if exact:
        assert len(allidx) == n


def _dominant_share(counts):
    tot = counts.sum(1)
    nz = tot > 0
    return float((counts.max(1)[nz] / tot[nz]).mean())


def _max_prop_gap(counts, labels):
    glob = np.bincount(labels, minlength=counts.shape[1]) / len(labels)
    props = counts / counts.sum(1, keepdims=True)
    return float(np.abs(props - glob).max())


@pytest.mark.parametrize("scheme,kw,exact", [
    ("iid", {}, True),
    ("dirichlet", dict(alpha=0.5), True),
    ("dirichlet", dict(alpha=0.5, self_balancing=True), True),
    ("balanced-dirichlet", dict(alpha=0.5), False),
    ("pathological", dict(classes_per_client=2), True),
])
@pytest.mark.parametrize("k", [7, 20])
def test_every_sample_at_most_once(scheme, kw, exact, k):
    parts = partition(Y, scheme, k, seed=3, **kw)
    assert len(parts) == k
    _check_disjoint(parts, N, exact)


def test_iid_sizes_and_proportions():
    parts = iid(Y, 6, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == N
    assert _max_prop_gap(label_counts(Y, parts, C), Y) < 0.06


@pytest.mark.parametrize("fn", [
    lambda seed: dirichlet(Y, 8, 1e4, seed, min_size=10),
    lambda seed: balanced_dirichlet(Y, 8, 1e4, seed),
])
def test_large_alpha_is_iid(fn):
    counts = label_counts(Y, fn(0), C)
    # Each client holds ~N/8 = 487 samples; with alpha=1e4 its class proportions are the global ones
    # up to rounding (< 1 sample per class), so the gap is far below sampling noise.
    assert _max_prop_gap(counts, Y) < 0.01


def test_small_alpha_gives_one_class_per_client():
    shares = []
    for seed in range(4):
        # min_size=0: with alpha=0.01 and as many clients as classes some clients get nothing.
        shares.append(_dominant_share(label_counts(Y, dirichlet(Y, 10, 0.01, seed, min_size=0), C)))
        shares.append(_dominant_share(label_counts(Y, balanced_dirichlet(Y, 20, 0.01, seed), C)))
    assert np.mean(shares) > 0.8 and min(shares) > 0.6, shares


def test_skew_grows_as_alpha_shrinks():
    dom = {a: np.mean([_dominant_share(label_counts(Y, balanced_dirichlet(Y, 20, a, s), C)) for s in range(3)])
           for a in (0.05, 0.5, 5.0)}
    assert dom[0.05] > dom[0.5] > dom[5.0]


def test_dirichlet_min_size_is_enforced():
    redrawn = 0
    for seed in range(10):
        parts = dirichlet(Y, 20, 0.3, seed, min_size=40)
        assert min(len(p) for p in parts) >= 40
        _check_disjoint(parts, N, exact=True)
        try:
            first = dirichlet(Y, 20, 0.3, seed, min_size=40, max_tries=1)
            assert all(np.array_equal(a, b) for a, b in zip(first, parts))  # accepted first draw is kept
        except FedLatentError:
            redrawn += 1
    assert redrawn > 0, "some first draws should have been too small (so the redraw path was tested)"


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(FedLatentError, match="min_size"):
        dirichlet(Y, 100, 0.5, 0, min_size=N // 100 + 1)  # more than N in total
    # Feasible in principle but (almost) never drawn: 2 classes spread over 50 clients with alpha=0.001.
    y2 = np.repeat([0, 1], 500)
    with pytest.raises(FedLatentError, match="balanced-dirichlet"):
        dirichlet(y2, 50, 0.001, 0, min_size=10)


def test_dirichlet_self_balancing_caps_client_size():
    biggest_class = np.bincount(Y).max()
    seen_over = False
    for seed in range(6):
        sizes = [len(p) for p in dirichlet(Y, 10, 0.1, seed, min_size=0, self_balancing=True)]
        # a client only receives a class while it holds <= N/K samples
        assert max(sizes) <= N / 10 + biggest_class
        plain = [len(p) for p in dirichlet(Y, 10, 0.1, seed, min_size=0)]
        seen_over |= max(plain) > N / 10 + biggest_class
    assert seen_over, "without self-balancing some client should exceed the bound for alpha=0.1"


@pytest.mark.parametrize("k", [7, 10, 80])
def test_balanced_sizes_exact(k):
    parts = balanced_dirichlet(Y, k, 0.05, seed=1)
    assert {len(p) for p in parts} == {N // k}
    assert sum(len(p) for p in parts) == N - N % k


def test_balanced_handles_tiny_alpha_and_imbalanced_classes():
    y = np.repeat(np.arange(5), [1, 9, 40, 150, 800])  # very uneven
    parts = balanced_dirichlet(y, 25, 1e-4, seed=0)
    assert {len(p) for p in parts} == {1000 // 25}
    _check_disjoint(parts, len(y), exact=True)


@pytest.mark.parametrize("k,classes_per_client", [(10, 1), (10, 2), (7, 3), (50, 2), (3, 2)])
def test_pathological_exact_classes(k, classes_per_client):
    parts = pathological(Y, k, classes_per_client, seed=2)
    counts = label_counts(Y, parts, C)
    assert np.all((counts > 0).sum(1) == classes_per_client)
    usage = (counts > 0).sum(0)
    if k * classes_per_client >= C:
        assert usage.max() - usage.min() <= 1  # every class dealt to floor/ceil(K k / C) clients
        _check_disjoint(parts, N, exact=True)
    else:
        assert (usage > 0).sum() == k * classes_per_client  # the other classes are left out
        _check_disjoint(parts, N, exact=False)


def test_pathological_class_too_small():
    y = np.array([0] * 3 + [1] * 100)
    with pytest.raises(FedLatentError, match="class 0 has 3 samples"):
        pathological(y, 8, 2, seed=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded_determinism(scheme):
    a = partition(Y, scheme, 12, seed=5, alpha=0.3)
    b = partition(Y, scheme, 12, seed=5, alpha=0.3)
    c = partition(Y, scheme, 12, seed=6, alpha=0.3)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="iid", num_clients=0), "at least 1"),
    (dict(scheme="dirichlet", num_clients=-3), "at least 1"),
    (dict(scheme="iid", num_clients=N + 1), "more clients than samples"),
    (dict(scheme="balanced-dirichlet", num_clients=N + 1), "more clients than samples"),
    (dict(scheme="iid", num_clients=2.5), "integer"),
    (dict(scheme="dirichlet", num_clients=5, alpha=0), "alpha"),
    (dict(scheme="dirichlet", num_clients=5, alpha=-1), "alpha"),
    (dict(scheme="balanced-dirichlet", num_clients=5, alpha=float("nan")), "alpha"),
    (dict(scheme="balanced-dirichlet", num_clients=5, alpha="x"), "alpha"),
    (dict(scheme="dirichlet", num_clients=5, min_size=-1), "min_size"),
    (dict(scheme="pathological", num_clients=5, classes_per_client=C + 1), "classes_per_client"),
    (dict(scheme="pathological", num_clients=5, classes_per_client=0), "classes_per_client"),
    (dict(scheme="quantity-skew", num_clients=5), "unknown partition scheme"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(FedLatentError, match=match):
        partition(Y, seed=0, **kwargs)


@pytest.mark.parametrize("labels,match", [
    (np.zeros((4, 2), dtype=np.int64), "1-D"),
    (np.array([0.5, 1.0]), "integers"),
    (np.array([0, -1, 2]), "non-negative"),
])
def test_bad_labels(labels, match):
    with pytest.raises(FedLatentError, match=match):
        iid(labels, 1, seed=0)


def test_label_counts():
    y = np.array([0, 1, 1, 2, 2, 2])
    counts = label_counts(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(FedLatentError, match="out of range"):
        label_counts(y, [np.arange(6)], 2)


@pytest.mark.parametrize("k", [5, 100])
def test_save_partition_report(tmp_path, k):
    parts = partition(Y, "dirichlet", k, seed=0, alpha=0.5, min_size=1)
    counts = label_counts(Y, parts, C)
    names = [f"class, {i}" for i in range(C)]  # a comma must survive the CSV round trip
    csv_path, png_path = save_partition_report(tmp_path / "report", counts, names)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["client", *names, "total"]
    table = np.array([[int(v) for v in r] for r in rows[1:]])
    assert np.array_equal(table[:, 0], np.arange(k))
    assert np.array_equal(table[:, 1:-1], counts) and np.array_equal(table[:, -1], counts.sum(1))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FedLatentError, match="counts must be"):
        save_partition_report(tmp_path, counts, names[:-1])


def test_sinkhorn_is_a_diagonal_scaling_with_the_target_marginals():
    from fedlatent.data.partition import _log_dirichlet, _sinkhorn

    rng = np.random.default_rng(0)
    for alpha, (rows, cols) in [(0.5, (10, 30)), (0.01, (10, 80)), (1e-3, (4, 4))]:
        log_p = _log_dirichlet(rng, alpha, rows, cols)
        assert np.all(np.isfinite(log_p)) and np.allclose(np.exp(log_p).sum(1), 1)  # rows are Dirichlet draws
        r = rng.integers(50, 500, rows).astype(float)
        c = np.full(cols, r.sum() / cols)
        log_plan = _sinkhorn(log_p, r, c)
        plan = np.exp(log_plan)
        assert np.allclose(plan.sum(1), r, rtol=1e-9)
        assert np.abs(plan.sum(0) - c).max() <= 0.01
        # log(plan) - log(p) = u_i + v_j: the double-centred residual vanishes
        d = log_plan - log_p
        resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + d.mean()
        assert np.abs(resid).max() < 1e-6 * max(1.0, np.abs(d).max())


def test_apportion_largest_remainder_and_caps():
    from fedlatent.data.partition import _apportion

    w = np.array([0.5, 0.3, 0.2])
    assert _apportion(w, 10, np.array([100, 100, 100])).tolist() == [5, 3, 2]
    got = _apportion(np.array([0.34, 0.33, 0.33]), 10, np.array([100, 100, 100]))
    assert got.tolist() == [4, 3, 3]  # largest remainder gets the extra unit
    capped = _apportion(w, 10, np.array([2, 100, 100]))  # the rest of class 0's share goes to 1 and 2 (3:2)
    assert capped.tolist() == [2, 5, 3]
    zero = _apportion(np.array([1.0, 0.0, 0.0]), 4, np.array([0, 2, 5]))  # only weight has no room
    assert zero.sum() == 4 and np.all(zero <= [0, 2, 5])
    rng = np.random.default_rng(1)
    for _ in range(50):
        w = rng.dirichlet(np.full(6, 0.3))
        cap = rng.integers(0, 20, 6)
        total = int(rng.integers(0, cap.sum() + 1))
        got = _apportion(w, total, cap)
        assert got.sum() == total and np.all((got >= 0) & (got <= cap))
        if np.all(w / w.sum() * total <= cap):  # no cap binds: plain largest-remainder rounding
            assert np.all(np.abs(got - w / w.sum() * total) < 1)


def test_balanced_plan_keeps_clients_nearly_single_class():
    # As many clients as classes, tiny alpha: the Sinkhorn-balanced plan gives each client mostly
    # one class (mean dominant share 0.85 here; rounding a plan that is not balanced first leaves
    # the last clients with mixtures of leftovers: 0.72).
    dom = [_dominant_share(label_counts(Y, balanced_dirichlet(Y, 10, 1e-3, s), C)) for s in range(8)]
    assert np.mean(dom) > 0.8, dom
