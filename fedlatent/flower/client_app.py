"""The fedlatent ClientApp: one SuperNode = one fedlatent client.

Node config (``--node-config`` of ``flower-supernode``; set automatically in simulation):

* ``partition-id`` / ``num-partitions``: this node's client id and the number of clients. The node loads the
  run's dataset (``dataset`` of the run config; ``data-root`` of the node config overrides where it lives) and
  keeps exactly the share the in-process engine gives client ``partition-id``
  (:func:`fedlatent.flower.spec.client_partition`, seeded by the run's seed);
* ``device`` (optional): where local training runs (default: the run's ``device``).

Messages (the server side is :class:`fedlatent.flower.strategy.FedLatentStrategy`):

* ``query``: load the data, reply ``partition-id``, ``num-partitions`` and the sample count;
* ``train``: rebuild the run's fedlatent Strategy from the spec in the message (constructor arguments only),
  run its ``client_update`` on the payload - FedDGM: local SGD on the surrogate, reply ``start`` / ``end``
  only; FedAvg / DynaFed: local SGD, reply the weights - and reply the upload with ``num-examples`` and the
  local metrics (``train_loss``). The node never sends anything else (no data, no labels, no local state).
"""
from __future__ import annotations

from . import require_flwr

require_flwr()

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..fl.base import ClientData
from ..utils import FedLatentError
from .messages import ARRAYS, CONFIG, record_to_tensors, upload_to_content
from .spec import RunSpec, client_partition, load_data, make_context

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"


@dataclass
class LocalData:
    """One node's view of the run: its client id, its training samples and the run context."""

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    ctx: Any


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()  # the run's training set, partition and context
_STRATEGIES: "OrderedDict[str, Any]" = OrderedDict()
_CACHE_SIZE = 4


def _node_int(node_config, key: str) -> int:
    if key not in node_config:
        raise FedLatentError(f"this SuperNode has no {key!r} in its node config; start it with "
                             f"--node-config \"{PARTITION_ID}=<i> {NUM_PARTITIONS}=<clients>\"")
    v = node_config[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not str(v).lstrip("-").isdigit():
        raise FedLatentError(f"node config {key}={v!r} is not an integer")
    return int(v)


def local_data(spec: RunSpec, node_config) -> LocalData:
    """The node's data for ``spec``.

    The training set and its partition are cached per process (a simulation actor serves several virtual
    nodes, a SuperNode several rounds); the node's share is sliced out on each call.
    """
    cfg = spec.fl_config()
    pid, parts_n = _node_int(node_config, PARTITION_ID), _node_int(node_config, NUM_PARTITIONS)
    if parts_n != cfg.clients:
        raise FedLatentError(f"node config num-partitions={parts_n}, but the run has {cfg.clients} clients")
    if not 0 <= pid < parts_n:
        raise FedLatentError(f"node config partition-id={pid} is outside 0..{parts_n - 1}")
    root = node_config.get("data-root") or None
    device = str(node_config.get("device") or "") or None
    key = (spec.dataset, spec.resolved_image_size(), spec.data_root, root, spec.exclude_generator, device,
           tuple(sorted((k, str(v)) for k, v in spec.config.items())))
    if key not in _CACHE:
        from ..fl.simulation import resolve_device

        dev = resolve_device(device or cfg.device)
        data = load_data(spec, root)
        parts = client_partition(data.y_train.cpu().numpy(), cfg)
        ctx = make_context(spec, data, [int(len(p)) for p in parts], str(dev))
        _CACHE[key] = (data.x_train.to(dev), data.y_train.to(dev), parts, ctx)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    x, y, parts, ctx = _CACHE[key]
    idx = torch.from_numpy(parts[pid]).to(x.device)
    return LocalData(pid, x.index_select(0, idx), y.index_select(0, idx), ctx)


def local_strategy(spec: RunSpec):
    """The run's fedlatent Strategy, built from its constructor arguments (cached per spec)."""
    key = spec.to_json()
    if key not in _STRATEGIES:
        _STRATEGIES[key] = spec.build_strategy()
        while len(_STRATEGIES) > _CACHE_SIZE:
            _STRATEGIES.popitem(last=False)
    return _STRATEGIES[key]


def _spec(msg: Message) -> RunSpec:
    try:
        return RunSpec.from_json(msg.content[CONFIG]["spec"])
    except KeyError:
        raise FedLatentError("message without a fedlatent run spec (is the server a fedlatent ServerApp?)") from None


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Load the node's data and tell the server who this node is."""
    local = local_data(_spec(msg), context.node_config)
    reply = ConfigRecord({PARTITION_ID: local.client_id, NUM_PARTITIONS: local.ctx.config.clients,
                          "num-examples": int(local.y.shape[0])})
    return Message(RecordDict({CONFIG: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local work: the fedlatent strategy's ``client_update`` on the received payload."""
    spec = _spec(msg)
    config = msg.content[CONFIG]
    local = local_data(spec, context.node_config)
    cid, rnd = int(config["client-id"]), int(config["server-round"])
    if cid != local.client_id:
        raise FedLatentError(f"the server addressed client {cid}, but this node is partition {local.client_id}")
    strategy = local_strategy(spec)
    payload = record_to_tensors(msg.content[ARRAYS], local.ctx.device)
    upload = strategy.client_update(local.ctx, rnd, cid, payload, ClientData(cid, local.x, local.y))
    return Message(upload_to_content(upload), reply_to=msg)


__all__ = ["app", "local_data", "local_strategy", "LocalData"]
