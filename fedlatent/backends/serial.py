"""The serial backend: the round's jobs run in this process, in order (the default)."""
from __future__ import annotations

from typing import Any, Callable, Iterable


def sequential_map(fn: Callable[..., Any], jobs: Iterable[tuple]) -> list:
    """The default client runner: ``[fn(*args) for args in jobs]`` in this process, in order."""
    return [fn(*args) for args in jobs]


__all__ = ["sequential_map"]
