"""Expert-trajectory segments for trajectory matching: ``sampler(it) -> (theta_start, theta_target)``.

* :class:`TrajectorySampler` -- MTT (Cazenavette et al. 2022): an expert uniformly, ``start`` uniform in
  ``[min_start, min(max_start_epoch, T - M))``, target = snapshot ``start + M``; with ``average=(lo, hi)`` the
  mean of ``k ~ U{lo..hi}`` snapshots of ``start+1 .. start+M`` drawn with replacement. Used by pixel MTT
  (:mod:`fedlatent.distill.pixels`).
* :func:`sample_segment` / :func:`segment_target` / :class:`GlobalTrajectorySampler` -- DynaFed (Pi et al.
  2023, reference Synthesizer) over the one global trajectory: ``k`` *distinct* snapshots averaged (see
  :mod:`fedlatent.fl.methods.dynafed`).
* FedDGM matches one fixed segment per client (``start -> end`` of its upload): a constant sampler.

Every sampler is seeded: ``sampler(it)`` is a function of (seed, it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import FedLatentError
from ..utils import numpy_rng

Segment = tuple[torch.Tensor, torch.Tensor]


class TrajectorySampler:
    """Segments of expert trajectories (each a sequence of flat parameter snapshots, one per epoch).

    MTT: pick an expert uniformly, ``start`` uniform in ``[min_start, min(max_start_epoch, T - M))``,
    target = snapshot ``start + M`` (M = ``expert_epochs``). DynaFed (``average=(lo, hi)``): the
    target is the mean of ``k ~ U{lo..hi}`` snapshots drawn with replacement from
    ``start+1 .. start+M``. Seeded: ``sampler(it)`` is a function of (seed, it).
    """

    def __init__(self, trajectories: Sequence[Sequence[torch.Tensor] | torch.Tensor], expert_epochs: int,
                 max_start_epoch: int, seed: int = 0, min_start_epoch: int = 0,
                 average: tuple[int, int] | None = None):
        if not trajectories:
            raise FedLatentError("no expert trajectories given")
        self.trajectories = trajectories
        self.M, self.seed, self.average = int(expert_epochs), int(seed), average
        lengths = [len(t) for t in trajectories]
        self.hi = [min(int(max_start_epoch), n - self.M) for n in lengths]
        self.lo = int(min_start_epoch)
        for i, (n, hi) in enumerate(zip(lengths, self.hi)):
            if hi <= self.lo:
                raise FedLatentError(
                    f"expert trajectory {i} has {n} snapshots: too short for expert_epochs={self.M} "
                    f"starting at epoch >= {self.lo} (needs at least {self.lo + self.M + 1})")
        if average is not None and not 1 <= average[0] <= average[1]:
            raise FedLatentError(f"target averaging range must be 1 <= lo <= hi, got {average}")

    def __call__(self, it: int) -> Segment:
        rng = numpy_rng(self.seed, "segment", it)
        e = int(rng.integers(len(self.trajectories)))
        traj = self.trajectories[e]
        start = int(rng.integers(self.lo, self.hi[e]))
        theta_start = traj[start]
        if self.average is None:
            return theta_start, traj[start + self.M]
        k = int(rng.integers(self.average[0], self.average[1] + 1))
        picks = rng.integers(start + 1, start + self.M + 1, size=k)
        target = torch.stack([traj[int(j)] for j in picks]).mean(0)
        return theta_start, target


@dataclass(frozen=True)
class SegmentIndex:
    """One matching target: start snapshot index and the snapshot indices averaged into the target."""

    start: int
    targets: tuple[int, ...]


def sample_segment(num_snapshots: int, expert_epochs: int, rng: np.random.Generator, *, min_start: int = 0,
                   max_start: int = 50, weight_averaging: bool = True, least_ave_num: int = 2,
                   max_ave_num: int = 10) -> "SegmentIndex":
    """Draw a trajectory segment (DynaFed's Synthesizer; MTT's start/target sampling).

    ``start`` is uniform in ``[min(min_start, hi), hi]`` with ``hi = min(max_start, num_snapshots - 1 -
    expert_epochs)``. Without weight averaging the target is snapshot ``start + expert_epochs``;
    with it, ``k`` distinct snapshots of ``start+1 .. start+expert_epochs`` (sorted), ``k`` uniform in
    ``[min(least_ave_num, k_max), k_max]`` with ``k_max = min(max_ave_num, expert_epochs)``.
    """
    if expert_epochs < 1:
        raise FedLatentError(f"expert_epochs must be >= 1, got {expert_epochs}")
    hi = min(max_start, num_snapshots - 1 - expert_epochs)
    if hi < 0:
        raise FedLatentError(f"the global trajectory has {num_snapshots} snapshots; a segment of "
                             f"{expert_epochs} rounds needs at least {expert_epochs + 1} (synthesise later)")
    lo = min(max(min_start, 0), hi)
    start = int(rng.integers(lo, hi + 1))
    if not weight_averaging:
        return SegmentIndex(start, (start + expert_epochs,))
    k_max = max(1, min(max_ave_num, expert_epochs))
    k = int(rng.integers(min(max(least_ave_num, 1), k_max), k_max + 1))
    picks = rng.choice(np.arange(start + 1, start + expert_epochs + 1), size=k, replace=False)
    return SegmentIndex(start, tuple(sorted(int(i) for i in picks)))


def segment_target(snapshots: Sequence[torch.Tensor], segment: "SegmentIndex") -> torch.Tensor:
    """The matching target: the mean of ``snapshots[i]`` for ``i`` in ``segment.targets``.

    Accumulated in float64 and returned in the snapshots' dtype (DynaFed's weight-averaged
    target with uniform weights; a single index returns that snapshot unchanged).
    """
    if not segment.targets:
        raise FedLatentError("a segment needs at least one target snapshot")
    if len(segment.targets) == 1:
        return snapshots[segment.targets[0]].clone()
    acc = torch.zeros_like(snapshots[segment.targets[0]], dtype=torch.float64)
    for i in segment.targets:
        acc += snapshots[i].to(torch.float64)
    return (acc / len(segment.targets)).to(snapshots[segment.targets[0]].dtype)




class GlobalTrajectorySampler:
    """Segment sampler for :class:`fedlatent.distill.distiller.Distiller` over the global trajectory.

    ``sampler(it) -> (theta_start, theta_target)`` draws :func:`sample_segment` from the stream
    (seed, "dynafed", "segment", it) and builds the target with :func:`segment_target`; every drawn
    :class:`SegmentIndex` is appended to ``segments`` (which snapshots were matched, for logs and tests).
    """

    def __init__(self, snapshots: Sequence[torch.Tensor], cfg: Any, seed: int):
        self.snapshots, self.cfg, self.seed = list(snapshots), cfg, int(seed)
        self.segments: list[SegmentIndex] = []
        sample_segment(len(self.snapshots), cfg.expert_epochs, numpy_rng(0), max_start=cfg.max_start)  # validates

    def __call__(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        seg = sample_segment(len(self.snapshots), c.expert_epochs, numpy_rng(self.seed, "dynafed", "segment", it),
                             min_start=c.min_start, max_start=c.max_start, weight_averaging=c.weight_averaging,
                             least_ave_num=c.least_ave_num, max_ave_num=c.max_ave_num)
        self.segments.append(seg)
        return self.snapshots[seg.start], segment_target(self.snapshots, seg)


__all__ = ["Segment", "SegmentIndex", "TrajectorySampler", "sample_segment", "segment_target", "GlobalTrajectorySampler"]
