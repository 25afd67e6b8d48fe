"""What a Flower run of a fedlatent method needs on both sides, without importing Flower.

:class:`RunSpec` names the method, its options, the :class:`~fedlatent.fl.base.FLConfig` and the dataset.
The server builds it (from the Python API or from the Flower run config, :func:`spec_from_run_config`)
and sends it as JSON with every message, so a ClientApp rebuilds exactly the server's
:class:`~fedlatent.fl.base.Strategy` (constructor arguments only: ``client_update`` reads nothing else)
and carves exactly the engine's partition out of its copy of the data (:func:`client_partition`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from ..utils import FedLatentError

#: Run-config keys read by the ServerApp only (not part of the spec sent to clients).
SERVER_KEYS = {"out-dir": None, "overwrite": False, "timeout": 3600.0, "wait-nodes": 300.0, "progress": False}
#: Spec keys of the Flower run config (dashes; underscores are accepted too).
SPEC_KEYS = ("method", "dataset", "image-size", "data-root", "exclude-public")
OPTION_PREFIX = "method-options."


@dataclass
class RunSpec:
    """One federated run: method + options, FLConfig fields, dataset (all JSON-serialisable).

    ``exclude_generator``: the generator whose public split is removed from the clients' training data
    (FedDGM with a generator trained on a public part of the same dataset; None: nothing is removed).
    """

    method: str = "fedavg"
    dataset: str = "digits"
    image_size: int | None = None
    data_root: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    exclude_generator: str | None = None

    def fl_config(self):
        """The checked :class:`~fedlatent.fl.base.FLConfig` (unknown fields -> FedLatentError)."""
        from ..fl.base import FLConfig

        fields = set(FLConfig.__dataclass_fields__)
        unknown = sorted(set(self.config) - fields)
        if unknown:
            raise FedLatentError(f"unknown simulation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
        return FLConfig(**self.config).check()

    def build_strategy(self):
        """A fresh fedlatent Strategy of ``method`` with ``method_options`` (not set up)."""
        from ..fl.base import get_method

        cls = get_method(self.method)
        try:
            return cls(**self.method_options)
        except TypeError as e:
            raise FedLatentError(f"bad options for method {self.method!r}: {e}") from None

    def resolved_image_size(self) -> int | None:
        """``image_size``, or 16 for ``digits`` (the default of ``fedlatent simulate``)."""
        if self.image_size is None and self.dataset == "digits":
            return 16
        return self.image_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise FedLatentError(f"bad run spec from the server: {e}") from None
        if not isinstance(d, dict) or set(d) - set(cls.__dataclass_fields__):
            raise FedLatentError("bad run spec from the server (not a fedlatent RunSpec)")
        return cls(**d)


def split_options(method: str, options: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split ``options`` into FLConfig fields and options of ``method`` (unknown -> error)."""
    from ..fl.base import get_method
    from ..fl.options import split_options as split

    return split(get_method(method), options, where=f" for method {method!r}")


def _value(v: Any) -> Any:
    """Flower run-config values are str/int/float/bool; an empty string stands for None (TOML has no null)."""
    return None if isinstance(v, str) and v == "" else v


def spec_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunSpec, dict[str, Any]]:
    """(spec, server options) from a Flower run config (``[tool.flwr.app.config]``, ``--run-config``).

    Keys: ``method``, ``dataset``, ``image-size`` (0 = dataset default), ``data-root``, ``exclude-public``;
    every :class:`~fedlatent.fl.base.FLConfig` field (``rounds``, ``clients``, ``seed``, ``local-epochs``, ...);
    the method's constructor arguments as ``<method>.<name>`` (e.g. ``feddgm.ipc = 2``, a TOML table
    ``[tool.flwr.app.config.feddgm]``; only the tables of the selected ``method`` are used, so one app can hold
    the settings of several methods) or ``method-options.<name>`` (any method); the server options ``out-dir``,
    ``overwrite``, ``timeout``, ``wait-nodes``, ``progress``. An empty string means None. Unknown keys raise
    FedLatentError.
    """
    from ..fl.base import FLConfig, available_methods

    fl_fields = set(FLConfig.__dataclass_fields__)
    top: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    server = dict(SERVER_KEYS)
    unknown = []
    methods = set(available_methods())
    per_method: dict[str, dict[str, Any]] = {}
    for key, v in run_config.items():
        v = _value(v)
        prefix, dot, name = key.partition(".")
        if dot and (prefix + "." == OPTION_PREFIX or prefix in methods):
            per_method.setdefault(prefix, {})[name.replace("-", "_")] = v
            continue
        k = key.replace("_", "-")
        if k in SERVER_KEYS:
            server[k] = v
        elif k in SPEC_KEYS:
            top[k] = v
        elif k.replace("-", "_") in fl_fields:
            cfg[k.replace("-", "_")] = v
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(set(SPEC_KEYS) | set(SERVER_KEYS) | {f.replace("_", "-") for f in fl_fields})
        raise FedLatentError(f"unknown run-config key(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}"
                             f", {OPTION_PREFIX}<name> and <method>.<name>")
    method = str(top.get("method") or "fedavg")
    meth = {**per_method.get(OPTION_PREFIX[:-1], {}), **per_method.get(method, {})}
    size = top.get("image-size")
    spec = make_spec(method, dataset=str(top.get("dataset") or "digits"),
                     image_size=int(size) if size else None, data_root=top.get("data-root"),
                     exclude_public=bool(top.get("exclude-public", False)), method_options=meth, config=cfg)
    return spec, server


def make_spec(method: str, *, dataset: str = "digits", image_size: int | None = None,
              data_root: str | os.PathLike | None = None, exclude_public: bool = False,
              method_options: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None) -> RunSpec:
    """A checked :class:`RunSpec` (the FLConfig is completed with its defaults; the method is built once)."""
    spec = RunSpec(method=str(method), dataset=str(dataset), image_size=None if image_size is None else int(image_size),
                   data_root=None if data_root is None else str(data_root), config=dict(config or {}),
                   method_options=dict(method_options or {}))
    spec.config = spec.fl_config().to_dict()  # raises on unknown / invalid fields; completes the defaults
    spec.build_strategy()  # raises on unknown method / bad options
    if exclude_public:
        spec.exclude_generator = public_split_generator(spec)
    return spec


def public_split_generator(spec: RunSpec) -> str | None:
    """The generator whose public split ``exclude_public`` removes: the method's (FedDGM: its ``generator`` or the
    dataset's default one); None for methods without a generator or in pixel space."""
    from ..fl.base import get_method
    from ..fl.options import option_names

    if "generator" not in option_names(get_method(spec.method)):
        return None
    gen = spec.method_options.get("generator")
    space = str(spec.method_options.get("space") or "").lower()
    if space == "pixel":
        return None
    if gen in (None, "", "none"):
        from ..generators.resolve import default_generator

        gen = default_generator(spec.dataset.strip().lower())
    return None if gen in (None, "", "none") else str(gen)


# ---------------------------------------------------------------------------------------------
# Data: the same training set, partition and test set as fedlatent.fl.simulation.run_simulation


def load_data(spec: RunSpec, data_root: str | None = None):
    """The run's :class:`~fedlatent.data.ImageData` (``data_root`` overrides the spec's, e.g. a node's own folder).

    With ``spec.exclude_generator`` the generator's public split is removed from the training set
    (:func:`fedlatent.apps.distill.private_training_data`), as ``fedlatent distill`` does.
    """
    from ..data import load_dataset

    data = load_dataset(spec.dataset, root=data_root or spec.data_root, resize=spec.resolved_image_size())
    if spec.exclude_generator:
        from ..apps.distill import private_training_data

        data, _ = private_training_data(data, spec.exclude_generator)
    return data


def client_partition(labels: np.ndarray, cfg) -> list[np.ndarray]:
    """Training-set indices of every client, exactly as the in-process engine draws them.

    The public split (``cfg.public_fraction``) comes first and the clients share the private rest with
    ``fedlatent.data.partition(..., seed=cfg.seed)`` (see :func:`fedlatent.fl.simulation.run_simulation`).
    """
    from ..fl.simulation import split_clients

    return split_clients(labels, cfg)[2]


def make_context(spec: RunSpec, data, client_sizes: list[int], device: str):
    """The :class:`~fedlatent.fl.base.FLContext` of the run (homogeneous clients, no public split)."""
    from ..fl.base import FLContext

    return FLContext(config=spec.fl_config(), num_classes=data.num_classes, channels=data.channels,
                     image_size=data.image_size, class_names=list(data.classes), client_sizes=list(client_sizes),
                     device=str(device), mean=tuple(data.mean), std=tuple(data.std), dataset=data.name)


def check_supported(strategy, cfg) -> None:
    """Refuse what the Flower integration cannot run yet, with one clear line."""
    from ..fl.base import Strategy

    if getattr(type(strategy), "client_init") is not getattr(Strategy, "client_init"):
        raise FedLatentError(f"method {strategy.name!r} keeps local state on the clients (client_init); the Flower "
                             "integration runs stateless clients only (fedavg, fedprox, feddgm, feddgm+avg, dynafed)")
    if cfg.client_models is not None:
        raise FedLatentError("client_models (heterogeneous clients) is not supported by the Flower integration")
    if cfg.public_fraction > 0:
        raise FedLatentError("public_fraction > 0 is not supported by the Flower integration (the server holds no "
                             "training data)")


def finite_metrics(d: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of ``d`` as floats (for Flower MetricRecords)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        v = float(v)
        if math.isfinite(v):
            out[str(k)] = v
    return out


__all__ = ["RunSpec", "make_spec", "split_options", "spec_from_run_config", "load_data", "client_partition",
           "make_context", "check_supported", "public_split_generator", "finite_metrics", "SERVER_KEYS"]
