"""fedlatent tensors and uploads <-> Flower records (ArrayRecord / MetricRecord / ConfigRecord).

A train message holds ``"arrays"`` (the strategy's ``client_payload``) and ``"config"`` (server round, client
id, the :class:`~fedlatent.flower.spec.RunSpec` as JSON); the reply holds ``"arrays"`` (``Upload.tensors``,
e.g. FedDGM's ``start`` / ``end`` only), ``"metrics"`` (``num-examples`` plus the client's scalar metrics)
and ``"config"`` (the client id the reply claims to answer for). Arrays travel as ``numpy.save`` bytes
without pickle, so every float is transmitted bit for bit.
"""
from __future__ import annotations

from . import require_flwr

require_flwr()

from typing import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..fl.base import TensorDict, Upload
from ..utils import FedLatentError
from .spec import finite_metrics

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
NUM_EXAMPLES = "num-examples"


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord with one Array per tensor (moved to CPU; names kept)."""
    rec = ArrayRecord()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise FedLatentError(f"{k}: not a tensor ({type(t).__name__})")
        if t.dtype == torch.bfloat16:
            raise FedLatentError(f"{k}: bfloat16 tensors cannot be sent through Flower (numpy has no bfloat16)")
        rec[str(k)] = Array(t.detach().cpu().contiguous().numpy())
    return rec


def record_to_tensors(rec: ArrayRecord, device: str | torch.device = "cpu") -> TensorDict:
    """The tensors of an ArrayRecord, in its order, on ``device``."""
    return {k: torch.from_numpy(a.numpy()).to(device) for k, a in rec.items()}


def upload_to_content(upload: Upload) -> RecordDict:
    """The reply content of a client's :class:`~fedlatent.fl.base.Upload` (local state is never sent)."""
    metrics = {NUM_EXAMPLES: int(upload.num_samples), **finite_metrics(upload.metrics)}
    return RecordDict({ARRAYS: tensors_to_record(upload.tensors), METRICS: MetricRecord(metrics),
                       CONFIG: ConfigRecord({"client-id": int(upload.client_id)})})


def content_to_upload(content: RecordDict, device: str | torch.device = "cpu") -> Upload:
    """Decode a reply into an :class:`~fedlatent.fl.base.Upload`; FedLatentError when records are missing.

    Nothing is checked here beyond the record structure: the values go through the engine's screening
    (:func:`fedlatent.fl.validate.validate_uploads`) like an in-process upload.
    """
    try:
        arrays, metrics, config = content[ARRAYS], content[METRICS], content[CONFIG]
    except KeyError as e:
        raise FedLatentError(f"reply without the {e.args[0]!r} record") from None
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord) or not isinstance(config, ConfigRecord):
        raise FedLatentError("reply records of the wrong type")
    m = dict(metrics)
    if NUM_EXAMPLES not in m or "client-id" not in config:
        raise FedLatentError(f"reply without {NUM_EXAMPLES!r} or 'client-id'")
    n = m.pop(NUM_EXAMPLES)
    return Upload(client_id=config["client-id"], tensors=record_to_tensors(arrays, device), num_samples=n,
                  metrics={k: float(v) for k, v in m.items() if isinstance(v, (int, float))})


__all__ = ["tensors_to_record", "record_to_tensors", "upload_to_content", "content_to_upload", "ARRAYS", "METRICS",
           "CONFIG", "NUM_EXAMPLES"]
