"""The client schedule of a run: which clients take part in each round (one seeded stream per round).

A leaf of the engine, so that client-side code (DP-SGD accounting, :mod:`fedlatent.privacy.dp`) can know how
often a client is scheduled without importing the engine.
"""
from __future__ import annotations

import math

import numpy as np

from ..utils import numpy_rng


def clients_per_round(num_clients: int, participation: float) -> int:
    """max(1, round(C * K)): the number of clients sampled per round (round half up)."""
    return max(1, min(num_clients, int(math.floor(participation * num_clients + 0.5))))


def client_schedule(num_clients: int, rounds: int, participation: float, seed: int) -> list[np.ndarray]:
    """The clients of rounds 1..rounds (sorted ids, sampled without replacement within a round).

    Round r uses its own stream (seed, "schedule", r): the schedule of the first rounds does not
    depend on the total number of rounds, and never on the method or the model.
    """
    m = clients_per_round(num_clients, participation)
    return [np.sort(numpy_rng(seed, "schedule", r).choice(num_clients, size=m, replace=False)) for r in range(1, rounds + 1)]


__all__ = ["clients_per_round", "client_schedule"]
