"""``fedlatent audit RUN_DIR``: what a finished run's synthetic set and global model reveal about the clients.

Members and non-members are reconstructed from the run folder, never guessed:

* the data set is reloaded from the provenance in config.json (name, image size, data root; FedDGM runs also
  drop the generator's public split, as recorded) - or taken from the caller (``data=``) for runs on data
  passed from Python;
* the clients' partition is redrawn from the recorded FLConfig (seed, scheme, alpha, public fraction) with the
  engine's own :func:`fedlatent.fl.simulation.split_clients`, and its per-client class counts must equal
  partition.csv, or the audit refuses;
* members = the union of the clients' training images; non-members = the reference half of the test set
  (:func:`fedlatent.privacy.features.heldout_split`); the other half is the public data of the feature extractor.

Then :mod:`.memorisation` runs on the synthetic set (FedDGM ``distilled.safetensors``, DynaFed
``pseudo.safetensors``; none for FedAvg-like methods) and :mod:`.mia` on the final global model
(``model.safetensors``). Results: ``privacy.json``, ``privacy.md``, ``closest_pairs.png`` and a "Privacy"
section in ``report.md``. Bad input (no config.json, no data provenance, a missing data set, an unfinished
run, a partition that does not match) raises a one-line :class:`FedLatentError`.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import FedLatentError, numpy_rng

PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "privacy.md"
PAIRS_PNG = "closest_pairs.png"
SYNTHETIC_FILES = ("distilled.safetensors", "pseudo.safetensors")


@dataclass
class RunData:
    run_dir: Path
    info: dict
    config: Any                       # FLConfig of the run
    data: Any                         # ImageData the clients' partition was drawn on
    parts: list[np.ndarray]
    member_idx: np.ndarray            # training-set indices of all client images
    method: str
    synthetic: tuple[torch.Tensor, torch.Tensor, str] | None = None   # (images normalised, labels, file name)
    notes: list[str] = field(default_factory=list)


def _bad(msg: str) -> None:
    raise FedLatentError(msg)


def _read_partition(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[int(v) for v in r[1:-1]] for r in rows[1:]], dtype=np.int64)


def _fl_config(d: dict):
    from ..fl.base import FLConfig

    known = {f.name for f in fields(FLConfig)}
    return FLConfig(**{k: v for k, v in d.items() if k in known})


def load_run(run_dir: str | os.PathLike, data=None, data_root: str | os.PathLike | None = None) -> RunData:
    """Check a run folder and reconstruct its data, partition and members (see the module docstring)."""
    from ..data import load_dataset
    from ..data.partition import label_counts
    from ..fl.simulation import split_clients

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir() or not cfg_path.is_file():
        _bad(f"{run_dir}: not a run folder (config.json missing)")
    try:
        info = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FedLatentError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (run_dir / "summary.json").is_file():
        done = 0
        if (run_dir / "metrics.csv").is_file():
            from ..fl.run import read_metrics

            rows = read_metrics(run_dir / "metrics.csv")
            done = int(rows[-1]["round"]) if rows else 0
        total = (info.get("config") or {}).get("rounds", "?")
        _bad(f"{run_dir}: the run is not finished (no summary.json; {done} of {total} rounds recorded); "
             "audit a finished run")
    ds, distill = info.get("dataset"), info.get("distill")
    name = (distill or {}).get("dataset", info.get("dataset_name"))
    if not isinstance(ds, dict) or not name or "config" not in info or not (run_dir / "partition.csv").is_file():
        _bad(f"{run_dir}: no data provenance (config.json needs the dataset, its config and partition.csv); "
             "cannot reconstruct the clients' data")
    cfg = _fl_config(info["config"])
    if data is None:
        image_size = (distill or {}).get("image_size", info.get("image_size_requested"))
        root = data_root or (distill or {}).get("data_root") or info.get("data_root")
        if image_size is None and name == "digits":
            image_size = 16
        try:
            data = load_dataset(name, root=root, resize=image_size)
        except FedLatentError as e:
            raise FedLatentError(f"{run_dir}: the run's dataset {name!r} cannot be loaded: {e}") from None
        excl = info.get("generator_public_split")
        if excl and excl.get("excluded"):
            from ..data import ImageData
            from ..generators.train import private_split_indices

            keep = torch.from_numpy(private_split_indices(len(data.y_train), float(excl["fraction"]), int(excl["seed"])))
            data = ImageData(data.name, data.x_train.index_select(0, keep).contiguous(),
                             data.y_train.index_select(0, keep), data.x_test, data.y_test, list(data.classes),
                             data.mean, data.std, data.source, dict(data.extra))
    if data.name != ds.get("name") or len(data.y_train) != ds.get("train") or len(data.y_test) != ds.get("test"):
        _bad(f"{run_dir}: the data do not match the run's ({data.name}, {len(data.y_train)} train / "
             f"{len(data.y_test)} test vs {ds.get('name')}, {ds.get('train')} / {ds.get('test')})")
    labels = data.y_train.cpu().numpy()
    _, _, parts = split_clients(labels, cfg)
    counts = label_counts(labels, parts, data.num_classes)
    recorded = _read_partition(run_dir / "partition.csv")
    if recorded.shape != counts.shape or not np.array_equal(recorded, counts):
        _bad(f"{run_dir}: the partition redrawn from config.json does not match partition.csv; the data or the "
             "seed differ from the run's")
    member_idx = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    rd = RunData(run_dir, info, cfg, data, parts, member_idx, str(info.get("method", "?")))
    rd.synthetic = _synthetic(run_dir)
    return rd


def _synthetic(run_dir: Path):
    p = run_dir / "distilled.safetensors"
    if p.is_file():
        from ..export import load_distilled

        ds, _ = load_distilled(p)
        y = ds.labels if ds.labels is not None and ds.labels.dim() == 1 else ds.labels.argmax(1)
        return ds.images.float(), y.long(), p.name
    p = run_dir / "pseudo.safetensors"
    if p.is_file():
        from ..artifacts.pseudo import load_pseudo_set

        pseudo, _, _ = load_pseudo_set(p)
        return pseudo.images.float(), pseudo.soft_labels.argmax(1).long(), p.name
    return None


def _denorm(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().cpu() * s + m).clamp(0, 1)


def _global_model(rd: RunData):
    from ..models import get_model
    from .model_io import load_global_state

    if rd.info.get("client_models"):
        _bad(f"{rd.run_dir}: a heterogeneous run has no single global model to attack")
    state = load_global_state(rd.run_dir)
    d = rd.data
    spec = rd.config.model

    def build():
        return get_model(spec, d.channels, d.num_classes, d.image_size)

    model = build()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FedLatentError(f"{rd.run_dir}: the saved global model does not fit {spec!r} "
                             f"({str(e).splitlines()[0]})") from None
    return model.eval(), build


def dp_summary(rd: RunData) -> dict | None:
    """Per-client (epsilon, delta) of a DP run, from the last row of metrics.csv."""
    if not getattr(rd.config, "dp", False):
        return None
    from ..fl.run import read_metrics

    last = read_metrics(rd.run_dir / "metrics.csv")[-1]
    eps = {int(k[len("dp_epsilon_c"):]): float(v) for k, v in last.items() if k.startswith("dp_epsilon_c") and v is not None}
    c = rd.config
    return {"delta": c.dp_delta, "clip": c.dp_clip, "noise_multiplier": c.dp_noise, "target_epsilon": c.dp_epsilon,
            "sigma_max": last.get("dp_sigma_max"), "epsilon_max": max(eps.values()) if eps else None,
            "epsilon_per_client": eps}


def audit_run(run_dir: str | os.PathLike, data=None, data_root: str | os.PathLike | None = None, *,
              members: int = 1000, shadows: int = 4, shadow_epochs: int = 15, extractor_epochs: int = 15,
              copy_quantile: float = 0.01, seed: int = 0, progress: bool = True, write: bool = True) -> dict:
    """Audit a finished run folder; returns the report dict (also written as privacy.json / privacy.md)."""
    from tqdm.auto import tqdm

    from .features import heldout_split, public_extractor
    from .memorisation import memorisation_audit, plot_closest_pairs
    from .mia import lira, threshold_attacks

    if members < 10 or shadows < 0:
        _bad("audit: members must be >= 10 and shadows >= 0")
    rd = load_run(run_dir, data=data, data_root=data_root)
    d = rd.data
    steps = tqdm(total=4, desc="privacy audit", disable=not progress, dynamic_ncols=True, initial=1)
    pub_idx, ref_idx = heldout_split(d.y_test.cpu().numpy(), seed)
    report: dict[str, Any] = {
        "run": str(rd.run_dir.name), "method": rd.method, "dataset": d.name,
        "alpha": rd.config.alpha, "clients": rd.config.clients, "seed": rd.config.seed,
        "members_total": int(len(rd.member_idx)), "heldout_reference": int(len(ref_idx)),
        "extractor_public": int(len(pub_idx)), "partition_verified": True,
        "final_accuracy": json.loads((rd.run_dir / "summary.json").read_text()).get("final_accuracy"),
    }
    # --- memorisation by the synthetic set
    if rd.synthetic is not None:
        syn, syn_y, fname = rd.synthetic
        ext = public_extractor(d.x_test[torch.from_numpy(pub_idx)], d.y_test[torch.from_numpy(pub_idx)],
                               d.num_classes, d.mean, d.std, name=d.name, epochs=extractor_epochs, seed=seed,
                               progress=progress)
        mem_x = _denorm(d.x_train[torch.from_numpy(rd.member_idx)], d.mean, d.std)
        mem_y = d.y_train[torch.from_numpy(rd.member_idx)].cpu()
        out_x = _denorm(d.x_test[torch.from_numpy(ref_idx)], d.mean, d.std)
        out_y = d.y_test[torch.from_numpy(ref_idx)].cpu()
        ctl_x = _denorm(d.x_test[torch.from_numpy(pub_idx)], d.mean, d.std)
        ctl_y = d.y_test[torch.from_numpy(pub_idx)].cpu()
        syn01 = _denorm(syn, d.mean, d.std)
        mem = memorisation_audit(syn01, syn_y.cpu(), mem_x, mem_y, out_x, out_y, control=ctl_x, control_y=ctl_y,
                                 extractor=ext, copy_quantile=copy_quantile)
        if write:
            plot_closest_pairs(rd.run_dir / PAIRS_PNG, syn01, mem_x, mem, class_names=list(d.classes), syn_y=syn_y)
        flagged = np.flatnonzero(mem["flags"]).tolist()
        report["memorisation"] = {k: v for k, v in mem.items() if k not in ("flags", "spaces")}
        report["memorisation"].update({"file": fname, "flagged_images": flagged[:1000],
                                       "flagged_nearest_member": [int(rd.member_idx[mem["spaces"]["pixel"].idx_mem[i]])
                                                                  for i in flagged[:1000]]})
    else:
        report["memorisation"] = None
    steps.update(1)
    # --- membership inference against the final global model
    target, build = _global_model(rd)
    m = min(members, len(rd.member_idx), len(ref_idx))
    mi = np.sort(numpy_rng(seed, "privacy", "mia", "members").choice(rd.member_idx, size=m, replace=False))
    ni = np.sort(numpy_rng(seed, "privacy", "mia", "non-members").choice(ref_idx, size=m, replace=False))
    x = torch.cat([d.x_train[torch.from_numpy(mi)], d.x_test[torch.from_numpy(ni)]]).float().cpu()
    y = torch.cat([d.y_train[torch.from_numpy(mi)], d.y_test[torch.from_numpy(ni)]]).long().cpu()
    is_member = np.r_[np.ones(m), np.zeros(m)].astype(np.int64)
    attacks = threshold_attacks(target, x, y, is_member)
    steps.update(1)
    if shadows > 0:
        attacks["lira"] = lira(target, build, x, y, is_member, shadows=shadows, epochs=shadow_epochs, seed=seed,
                               progress=progress)
    steps.update(1)
    steps.close()
    report["mia"] = {"members": m, "non_members": m, "attacks": attacks}
    report["dp"] = dp_summary(rd)
    if write:
        from ..fl.run import write_json
        from .report import privacy_markdown, update_report

        write_json(rd.run_dir / PRIVACY_JSON, report)
        md = privacy_markdown(report)
        from ..utils import atomic_write_text

        atomic_write_text(rd.run_dir / PRIVACY_MD, md + "\n")
        update_report(rd.run_dir / "report.md", md)
    return report


__all__ = ["RunData", "load_run", "audit_run", "dp_summary", "PRIVACY_JSON", "PRIVACY_MD", "PAIRS_PNG"]
