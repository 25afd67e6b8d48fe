"""Label-based splits of a training set among federated clients.

Every partitioner is a pure function of ``(labels, parameters, seed)`` and returns one sorted
``int64`` array of sample indices per client. A sample is given to at most one client; ``iid``
and ``dirichlet`` give every sample to exactly one client, ``balanced_dirichlet`` leaves out only
the ``N mod num_clients`` samples that do not fit the equal client size, and ``pathological``
leaves out the classes no client was dealt (only when ``num_clients * k < num_classes``).
The same arguments always give the same split; each scheme draws from its own seeded stream
(:func:`fedlatent.utils.numpy_rng`).

Schemes (``partition(labels, scheme, ...)``):

``iid``
    A random permutation cut into ``num_clients`` parts whose sizes differ by at most one.
``dirichlet``
    The label-skew split of Hsu et al. (2019) / Yurochkin et al. (2019) as implemented by
    flwr-datasets' ``DirichletPartitioner``: for each class (in sorted label order) the share of
    that class held by each client is drawn from Dir(alpha * 1_K), the class is cut at the floors
    of the cumulative shares, and the whole draw is repeated until every client holds at least
    ``min_size`` samples. ``self_balancing`` has flwr's meaning (off by default there and here):
    a client already holding more than N/K samples gets no share of the later classes.
    Differences from flwr, on purpose: the samples of a class are shuffled before they are cut
    (flwr cuts them in dataset order, so a sorted dataset would hand every client the same kind
    of sample), the returned indices are sorted, and up to ``max_tries`` (100) draws are made
    before giving up with a :class:`FedLatentError` that says what to change (flwr: 11 draws).
``balanced-dirichlet``
    The split of DynaFed (Pi et al., CVPR 2023; ``split_dirichlet(double_stochstic=True)`` in
    pipilurj/DynaFed): the class x client matrix has rows ~ Dir(alpha * 1_K) (the share of each
    class held by each client), which is then rescaled by Sinkhorn iterations so that every client
    holds the same total. DynaFed scales towards unit row and column sums, which assumes equal
    class sizes; here the rows are scaled to the real class sizes, so imbalanced data sets
    (e.g. the shared CIFAR-10 subset) also give equal clients. The real-valued plan is then
    rounded to integers so that every client holds exactly ``floor(N / K)`` samples (DynaFed's
    floors give sizes that differ by a few samples). Small alpha gives each client (nearly) one
    class; large alpha gives IID clients.
``pathological``
    McMahan et al. (2017)'s shard split made exact: every client is dealt ``k`` distinct classes
    (the least-used classes so far, ties broken at random, so class usage stays balanced), and
    each class is cut into as many equal shards as clients hold it.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..utils import FedLatentError, atomic_write, numpy_rng

SCHEMES = ("iid", "dirichlet", "balanced-dirichlet", "pathological")


# --------------------------------------------------------------------------------------------
# validation helpers


def _as_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise FedLatentError(f"labels must be a 1-D vector, got shape {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise FedLatentError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if len(y) and y.min() < 0:
        raise FedLatentError("labels must be non-negative class indices")
    return y


def _check_clients(y: np.ndarray, num_clients) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise FedLatentError(f"num_clients must be an integer, got {num_clients!r}")
    k = int(num_clients)
    if k < 1:
        raise FedLatentError(f"num_clients must be at least 1, got {k}")
    if k > len(y):
        raise FedLatentError(f"cannot split {len(y)} samples among {k} clients (more clients than samples)")
    return k


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise FedLatentError(f"alpha must be a positive number, got {alpha!r}") from None
    if not (a > 0 and math.isfinite(a)):
        raise FedLatentError(f"Dirichlet alpha must be a positive finite number, got {alpha!r}")
    return a


def _finish(parts: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _cut(idx: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Consecutive blocks of ``idx`` of the given sizes (``sum(counts) <= len(idx)``)."""
    ends = np.cumsum(counts)
    return [idx[e - c : e] for c, e in zip(counts, ends)]


# --------------------------------------------------------------------------------------------
# partitioners


def iid(labels, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    y = _as_labels(labels)
    k = _check_clients(y, num_clients)
    perm = numpy_rng(seed, "partition", "iid").permutation(len(y))
    return _finish(np.array_split(perm, k))


def dirichlet(labels, num_clients: int, alpha: float, seed: int, min_size: int = 10,
              self_balancing: bool = False, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skew split: per class, client shares ~ Dir(alpha * 1_K) (flwr-datasets semantics).

    Redraws everything until each client holds at least ``min_size`` samples; after
    ``max_tries`` draws raises :class:`FedLatentError`. With ``self_balancing`` a client that
    already holds more than ``N / K`` samples gets no share of the classes that come later.
    """
    y = _as_labels(labels)
    k = _check_clients(y, num_clients)
    a = _check_alpha(alpha)
    min_size = int(min_size)
    if min_size < 0:
        raise FedLatentError(f"min_size must be >= 0, got {min_size}")
    if min_size * k > len(y):
        raise FedLatentError(
            f"min_size {min_size} x {k} clients = {min_size * k} exceeds the {len(y)} samples; lower min_size or num_clients"
        )
    rng = numpy_rng(seed, "partition", "dirichlet")
    classes = np.unique(y)
    class_idx = [np.flatnonzero(y == c) for c in classes]
    avg = len(y) / k
    smallest = 0
    for _ in range(max(1, int(max_tries))):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for idx in class_idx:
            share = rng.dirichlet(np.full(k, a))
            if self_balancing:
                share = np.where(sizes > avg, 0.0, share)
                total = share.sum()
                # All the mass fell on clients that are already full: spread over the others.
                share = share / total if total > 0 else (sizes <= avg) / np.count_nonzero(sizes <= avg)
            idx = rng.permutation(idx)
            cuts = (np.cumsum(share) * len(idx)).astype(np.int64)[:-1]
            for c, block in enumerate(np.split(idx, np.minimum(cuts, len(idx)))):
                parts[c].append(block)
                sizes[c] += len(block)
        smallest = int(sizes.min())
        if smallest >= min_size:
            return _finish([np.concatenate(p) for p in parts])
    raise FedLatentError(
        f"dirichlet split: no draw in {max_tries} gave every one of {k} clients >= {min_size} samples "
        f"(alpha={a}, {len(classes)} classes, {len(y)} samples; last smallest client: {smallest}). "
        f"Use a larger alpha, fewer clients, a smaller min_size, or the balanced-dirichlet scheme."
    )


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _log_dirichlet(rng: np.random.Generator, alpha: float, rows: int, cols: int) -> np.ndarray:
    """log of ``rows`` independent Dir(alpha * 1_cols) draws, without underflow for tiny alpha.

    Gamma(a) = Gamma(a + 1) * U^(1/a) (Marsaglia & Tsang), so log G = log Gamma(a + 1) + log(U) / a
    stays finite where G itself would round to 0.
    """
    log_g = np.log(rng.gamma(alpha + 1.0, size=(rows, cols))) + np.log1p(-rng.random((rows, cols))) / alpha
    return log_g - _logsumexp(log_g, axis=1)[:, None]


def _sinkhorn(log_p: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray, iters: int = 10000,
              tol: float = 0.01) -> np.ndarray:
    """log of diag(u) exp(log_p) diag(v) with the given row and column sums (Sinkhorn, log domain).

    Stops once every column sum is within ``tol`` (in samples) of its target; the rows are exact.
    Nearly degenerate plans (tiny alpha) converge slowly, but the integer rounding that follows
    only needs the plan to be right to a fraction of a sample.
    """
    log_r, log_c = np.log(row_sums), np.log(col_sums)
    for i in range(iters):
        log_p = log_p + (log_c - _logsumexp(log_p, axis=0))[None, :]
        log_p = log_p + (log_r - _logsumexp(log_p, axis=1))[:, None]
        if i % 10 == 9 and np.max(np.abs(np.exp(_logsumexp(log_p, axis=0)) - col_sums)) <= tol:
            break
    return log_p


def _apportion(weights: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Integers summing to ``total``, each <= ``cap``, proportional to ``weights`` (largest remainder).

    Entries whose share exceeds their cap are filled to the cap and the rest is shared among the
    others in proportion to their weights (uniformly over those with room if they all weigh 0).
    When no cap binds this is exactly the largest-remainder (Hamilton) rounding of
    ``weights / sum(weights) * total``. Needs ``total <= cap.sum()``.
    """
    counts = np.zeros(len(cap), dtype=np.int64)
    while (need := total - int(counts.sum())) > 0:
        room = cap - counts
        w = np.where(room > 0, weights, 0.0)
        if not w.sum() > 0:
            w = (room > 0).astype(np.float64)
        ideal = w / w.sum() * need
        base = np.minimum(np.floor(ideal).astype(np.int64), room)
        if np.any(ideal > room):  # fill the capped entries, share the rest again
            counts += base
            continue
        frac = ideal - np.floor(ideal)  # sums to the `left` units still to give, each < 1
        left = need - int(base.sum())
        base[np.argsort(-frac, kind="stable")[:left]] += 1
        counts += base
    return counts


def balanced_dirichlet(labels, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """DynaFed's balanced Dirichlet split: every client holds exactly ``floor(N / K)`` samples.

    Class x client shares ~ Dir(alpha * 1_K) per class, Sinkhorn-scaled to the class sizes (rows)
    and to equal client totals (columns), rounded to integers client by client. The
    ``N mod K`` samples left over are given to no client.
    """
    y = _as_labels(labels)
    k = _check_clients(y, num_clients)
    a = _check_alpha(alpha)
    rng = numpy_rng(seed, "partition", "balanced-dirichlet")
    classes, n_c = np.unique(y, return_counts=True)
    m = len(y) // k
    log_p = _log_dirichlet(rng, a, len(classes), k)
    # Targets: rows hold class c's share of the K*m samples that are dealt, columns m each.
    plan = np.exp(_sinkhorn(log_p, n_c * (k * m / len(y)), np.full(k, float(m))))
    avail = n_c.astype(np.int64).copy()
    counts = np.zeros((len(classes), k), dtype=np.int64)
    for j in range(k):
        counts[:, j] = _apportion(plan[:, j], m, avail)
        avail -= counts[:, j]
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ci, c in enumerate(classes):
        for j, block in enumerate(_cut(rng.permutation(np.flatnonzero(y == c)), counts[ci])):
            parts[j].append(block)
    return _finish([np.concatenate(p) for p in parts])


def pathological(labels, num_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` distinct classes, in equal shards.

    Clients are dealt the least-used classes so far (random tie-break), so every class is held by
    ``floor`` or ``ceil`` of ``K * k / C`` clients; each class is shuffled and cut into that many
    near-equal shards. Classes no client was dealt (``K * k < C``) are left out.
    """
    y = _as_labels(labels)
    nk = _check_clients(y, num_clients)
    classes, n_c = np.unique(y, return_counts=True)
    if isinstance(classes_per_client, bool) or not isinstance(classes_per_client, (int, np.integer)):
        raise FedLatentError(f"classes_per_client must be an integer, got {classes_per_client!r}")
    kc = int(classes_per_client)
    if not 1 <= kc <= len(classes):
        raise FedLatentError(f"classes_per_client must be between 1 and the {len(classes)} classes present, got {kc}")
    rng = numpy_rng(seed, "partition", "pathological")
    usage = np.zeros(len(classes), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in classes]
    for client in range(nk):
        chosen = np.lexsort((rng.random(len(classes)), usage))[:kc]
        usage[chosen] += 1
        for ci in chosen:
            holders[ci].append(client)
    short = [(int(classes[i]), int(n_c[i]), int(usage[i])) for i in range(len(classes)) if n_c[i] < usage[i]]
    if short:
        c, n, u = short[0]
        raise FedLatentError(
            f"pathological split: class {c} has {n} samples but {u} clients need a shard of it; "
            f"use fewer clients or fewer classes_per_client"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(nk)]
    for ci, c in enumerate(classes):
        if not holders[ci]:
            continue
        shards = np.array_split(rng.permutation(np.flatnonzero(y == c)), len(holders[ci]))
        for client, shard in zip(rng.permutation(holders[ci]), shards):
            parts[client].append(shard)
    return _finish([np.concatenate(p) for p in parts])


def partition(labels, scheme: str, num_clients: int, seed: int, alpha: float = 0.5, min_size: int = 10,
              classes_per_client: int = 2, self_balancing: bool = False) -> list[np.ndarray]:
    """Split sample indices among ``num_clients`` clients with one of :data:`SCHEMES`."""
    s = str(scheme).strip().lower().replace("_", "-")
    if s == "iid":
        return iid(labels, num_clients, seed)
    if s == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_size=min_size, self_balancing=self_balancing)
    if s in ("balanced-dirichlet", "balanced"):
        return balanced_dirichlet(labels, num_clients, alpha, seed)
    if s in ("pathological", "shards"):
        return pathological(labels, num_clients, classes_per_client, seed)
    raise FedLatentError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


# --------------------------------------------------------------------------------------------
# reporting


def label_counts(labels, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """``[clients, classes]`` matrix of how many samples of each class each client holds."""
    y = _as_labels(labels)
    if len(y) and y.max() >= num_classes:
        raise FedLatentError(f"label {int(y.max())} is out of range for {num_classes} classes")
    out = np.zeros((len(parts), int(num_classes)), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    return out


def save_partition_report(out_dir: str | os.PathLike, counts: np.ndarray, class_names: Sequence[str]) -> tuple[Path, Path]:
    """Write ``partition.csv`` (client, per-class counts, total) and ``partition.png`` (heat map).

    Returns the two paths. The picture shows one column per client and one row per class (empty
    cells white), with the client sizes as bars above; it stays readable from 5 to 100+ clients.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(class_names):
        raise FedLatentError(f"counts must be [clients, {len(class_names)} classes], got shape {counts.shape}")
    out = Path(out_dir)
    csv_path, png_path = out / "partition.csv", out / "partition.png"

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["client", *class_names, "total"])
            for i, row in enumerate(counts):
                w.writerow([i, *row.tolist(), int(row.sum())])

    atomic_write(csv_path, write_csv)
    fig = _partition_figure(counts, list(class_names))
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return csv_path, png_path


def _partition_figure(counts: np.ndarray, class_names: list[str]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    import matplotlib

    n_clients, n_classes = counts.shape
    width = float(np.clip(3.0 + 0.22 * n_clients, 7.0, 20.0))
    height = float(np.clip(2.5 + 0.28 * n_classes, 4.5, 14.0)) + 1.5
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 4])
    totals = counts.sum(1)
    ax_bar.bar(np.arange(n_clients), totals, width=0.85, color="0.45")
    ax_bar.set_ylabel("samples")
    ax_bar.set_title(f"Label counts per client ({n_clients} clients, {n_classes} classes, {int(totals.sum())} samples)")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    data = np.ma.masked_equal(counts.T, 0)
    top = max(int(counts.max(initial=0)), 1)
    # Wide ranges (a few samples next to thousands) are easier to read on a log scale.
    norm = LogNorm(vmin=1, vmax=top) if top >= 100 else Normalize(vmin=0, vmax=top)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm, origin="upper")
    fig.colorbar(im, ax=[ax_bar, ax], shrink=0.8, label="samples (white: none)")
    ax.set_xlabel("client")
    if n_clients <= 40:
        ax.set_xticks(np.arange(n_clients))
        if n_clients > 20:
            ax.tick_params(axis="x", labelsize=7, labelrotation=90)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
    if n_classes <= 40:
        ax.set_yticks(np.arange(n_classes), labels=class_names, fontsize=8 if n_classes > 15 else 10)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
    ax.set_ylabel("class")
    if n_clients * n_classes <= 250 and n_clients <= 25:
        for (c, k), v in np.ndenumerate(counts.T):
            if v:
                rgba = cmap(norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                ax.text(k, c, str(v), ha="center", va="center", fontsize=7, color="black" if light else "white")
    return fig


__all__ = [
    "SCHEMES", "iid", "dirichlet", "balanced_dirichlet", "pathological", "partition", "label_counts",
    "save_partition_report",
]
