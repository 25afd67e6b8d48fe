"""The project's error types.

:class:`FedLatentError`: bad user input, configuration or files - the CLI prints its message on one line and
exits with status 2. :class:`DivergedError`: a numerical optimisation (trajectory matching, a synthetic set)
became non-finite; the callers that can go on without that set catch this type, never a message text.
"""
from __future__ import annotations


class FedLatentError(RuntimeError):
    """An error caused by user input or files; the CLI prints its message on one line and exits 2."""


class DivergedError(FedLatentError):
    """A loss, gradient, parameter or synthetic image became NaN/inf (the optimisation diverged)."""


def is_diverged(e: BaseException) -> bool:
    """Whether ``e`` reports a divergence: a :class:`DivergedError`.

    For one release a plain :class:`FedLatentError` whose message starts with ``"non-finite"`` (the message-only
    contract of earlier versions, e.g. a user's replacement of the meta-gradient) counts too.
    """
    if isinstance(e, DivergedError):
        return True
    return isinstance(e, FedLatentError) and str(e).startswith("non-finite")


__all__ = ["FedLatentError", "DivergedError", "is_diverged"]
