"""Screening of client uploads before aggregation.

Every upload is checked, in this order, and rejected with the first failing reason:

1. it is an :class:`~fedlatent.fl.base.Upload` whose ``client_id`` is the client the server asked
   (wrong or duplicated ids are rejected);
2. ``num_samples`` is a positive integer and, when the server knows the client's data size, not larger
   than it (a client cannot inflate its aggregation weight);
3. ``tensors`` is a dict of tensors with exactly the expected keys (missing / extra keys);
4. every tensor has the expected shape and dtype;
5. every floating-point tensor is finite (no NaN / Inf);
6. the update norm is plausible. The update norm is ||u - r||_2 over all tensors, where r is the
   payload the server sent that client for the same key (when shapes match), else 0, so for weight
   uploads it is the norm of the model delta. An upload is rejected when its norm exceeds
   ``norm_cap`` (absolute), or when at least 3 uploads survived checks 1-5 and its norm exceeds
   ``norm_factor`` x their median norm.

This is a sanity screen against broken or garbage uploads, not a Byzantine-robust aggregator: the
defaults (factor 100, cap 1e4) are far above what honest local SGD produces, so honest clients with
very different data sizes are never dropped. Rejections are logged (logger ``fedlatent.fl``) and
returned so the engine records them; the round continues with the accepted uploads.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .base import TensorDict, Upload, UploadSpec

log = logging.getLogger("fedlatent.fl")


@dataclass
class Rejection:
    client_id: int
    reason: str


def check_upload(upload: object, expected_client: int, spec: UploadSpec, max_samples: int | None = None) -> str | None:
    """Structural checks 1-5 of the module docstring; returns a reason, or None when the upload is fine."""
    if not isinstance(upload, Upload):
        return f"not an Upload (got {type(upload).__name__})"
    if upload.client_id != expected_client:
        return f"wrong client id {upload.client_id!r} (expected {expected_client})"
    n = upload.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_samples must be a positive integer, got {n!r}"
    if max_samples is not None and n > max_samples:
        return f"claims {n} samples but the client holds {max_samples}"
    if not isinstance(upload.tensors, Mapping):
        return f"tensors must be a dict, got {type(upload.tensors).__name__}"
    keys, want = set(upload.tensors), set(spec)
    if want - keys:
        return f"missing keys {sorted(want - keys)[:5]}"
    if keys - want:
        return f"unexpected keys {sorted(map(str, keys - want))[:5]}"
    for k, (shape, dtype) in spec.items():
        t = upload.tensors[k]
        if not isinstance(t, torch.Tensor):
            return f"{k}: not a tensor ({type(t).__name__})"
        if tuple(t.shape) != tuple(shape):
            return f"{k}: shape {tuple(t.shape)} != expected {tuple(shape)}"
        if t.dtype != dtype:
            return f"{k}: dtype {t.dtype} != expected {dtype}"
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            return f"{k}: contains {bad}"
    return None


def update_norm(tensors: TensorDict, reference: TensorDict | None = None) -> float:
    """||u - r||_2 over all floating tensors (r = reference[key] when present with the same shape, else 0)."""
    sq = 0.0
    for k, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        r = None if reference is None else reference.get(k)
        d = t.detach().double() if r is None or r.shape != t.shape else t.detach().double() - r.detach().to(t.device).double()
        sq += float(d.abs().pow(2).sum())
    return math.sqrt(sq)


def validate_uploads(
    uploads: Sequence[object],
    expected_ids: Sequence[int],
    spec_for: Callable[[int], UploadSpec],
    references: Mapping[int, TensorDict] | None = None,
    client_sizes: Sequence[int] | None = None,
    norm_factor: float = 100.0,
    norm_cap: float = 1e4,
    rnd: int | None = None,
) -> tuple[list[Upload], list[Rejection]]:
    """Split ``uploads`` (``uploads[i]`` answers the request to ``expected_ids[i]``) into accepted and rejected.

    ``spec_for(cid)`` is the strategy's :meth:`expected_upload`; ``references[cid]`` the payload sent to
    ``cid`` (for update norms). Returns ``(accepted, rejections)``; each rejection is also logged.
    """
    if len(uploads) != len(expected_ids):
        raise ValueError(f"{len(uploads)} uploads for {len(expected_ids)} requests")
    rejected: list[Rejection] = []
    survivors: list[tuple[Upload, float]] = []
    seen: set[int] = set()

    def reject(cid: int, reason: str) -> None:
        rejected.append(Rejection(int(cid), reason))
        where = f"round {rnd}: " if rnd is not None else ""
        log.warning("%srejected upload of client %d: %s", where, cid, reason)

    for up, cid in zip(uploads, expected_ids):
        if cid in seen:
            reject(cid, "duplicate upload for this client in the same round")
            continue
        seen.add(cid)
        max_n = None if client_sizes is None else int(client_sizes[cid])
        reason = check_upload(up, cid, spec_for(cid), max_n)
        if reason is None:
            norm = update_norm(up.tensors, None if references is None else references.get(cid))
            if not math.isfinite(norm) or norm > norm_cap:
                reason = f"update norm {norm:.4g} exceeds the absolute cap {norm_cap:.4g}"
        if reason is not None:
            reject(cid, reason)
        else:
            survivors.append((up, norm))

    accepted: list[Upload] = []
    median = statistics.median(n for _, n in survivors) if len(survivors) >= 3 else None
    for up, norm in survivors:
        if median is not None and median > 0 and norm > norm_factor * median:
            reject(up.client_id, f"update norm {norm:.4g} > {norm_factor:g} x median {median:.4g}")
        else:
            accepted.append(up)
    return accepted, rejected


__all__ = ["Rejection", "check_upload", "update_norm", "validate_uploads"]
