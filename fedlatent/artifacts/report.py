"""report.md of a ``fedlatent distill`` run: what ran, the accuracy table per round, timings."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ..utils import atomic_write_text
from . import DISTILLED_FILE, REPORT_FILE


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_report(folder: Path, rows: list[dict], record: Mapping[str, Any], sim, strategy,
                 excluded: Mapping[str, Any] | None, cpu_s: float | None = None,
                 comparison: str | None = None, premise: str | None = None) -> Path:
    """report.md: what ran, the accuracy table per round, timings."""
    cfg, meth = record["config"], record["method_options"]
    lines = [
        "# FedDGM run", "",
        f"- dataset: `{record['dataset']}` ({strategy.ctx.image_size} px, {strategy.ctx.num_classes} classes), "
        f"preset `{record['preset']}`",
        f"- clients: {cfg['clients']} ({cfg['partition']}, alpha {cfg['alpha']}), participation {cfg['participation']}, "
        f"{cfg['rounds']} rounds, {cfg['local_epochs']} local epochs (SGD lr {cfg['lr']}, momentum {cfg['momentum']})",
        f"- labels: {'learned soft labels' if getattr(strategy, 'soft_labels', False) else 'hard'}",
        f"- generator: `{strategy.generator_name or 'none'}` (sha256 {strategy.generator_sha256 or '-'}), "
        f"latent space {strategy.space}, init {strategy.init}",
        f"- distillation per client: ipc {strategy.ipc}, {strategy.iterations} iterations of {strategy.syn_steps} "
        f"syn_steps, lr_img {strategy.lr_img}, lr_w {strategy.lr_w}, lr_lr {strategy.lr_lr}, lr_teacher "
        f"{strategy.lr_teacher}, {strategy.mtt_mode} meta-gradient, batched={meth.get('batched', 'auto')}",
        f"- surrogate `{strategy.surrogate_spec}`, global model `{cfg['model']}`; server training {strategy.train_epochs} "
        f"epochs on the {strategy.pool_mode} pool (SGD lr {strategy.train_lr}, momentum {strategy.train_momentum}, "
        f"weight decay {strategy.train_weight_decay}, DSA {strategy.train_dsa})",
        f"- seed {cfg['seed']}, device {strategy.ctx.device}",
    ]
    if excluded:
        lines.append(f"- generator public split excluded from the clients' data: {excluded}")
    lines += ["", "## Global model accuracy", "",
              "| round | accuracy | loss | distill loss (first -> last) | syn lr | pool | local train loss | round s |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {int(r['round'])} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('loss'))} | "
                     f"{_fmt(r.get('distill_loss_first'))} -> {_fmt(r.get('distill_loss'))} | "
                     f"{_fmt(r.get('syn_lr'), '.4g')} | {_fmt(r.get('pool_size'), '.0f')} | "
                     f"{_fmt(r.get('train_loss'))} | {_fmt(r.get('round_s'), '.1f')} |")
    if comparison:  # the baseline section (fedlatent.compare.comparison_markdown)
        lines += ["", comparison.rstrip("\n")]
    if premise:  # the premise check (fedlatent.apps.premise.Premise.markdown)
        lines += ["", premise.rstrip("\n")]
    tot = {k: sum(float(r.get(k) or 0.0) for r in rows) for k in ("round_s", "distill_s", "server_train_s")}
    other = tot["round_s"] - tot["distill_s"] - tot["server_train_s"]
    lines += ["", "## Timings", "",
              f"- total wall time {sim.wall_s:.1f} s; rounds {tot['round_s']:.1f} s = server distillation "
              f"{tot['distill_s']:.1f} s + server training {tot['server_train_s']:.1f} s + clients/evaluation/IO "
              f"{other:.1f} s" + (f"; CPU time of this process {cpu_s:.1f} s" if cpu_s is not None else ""),
              f"- final accuracy {sim.final_accuracy:.4f}, best {sim.best_accuracy:.4f} (round {sim.best_round})",
              "", "## Files", "",
              "- `metrics.csv`, `accuracy.png`, `grid_round{r}.png` (distilled images per class), "
              f"`{DISTILLED_FILE}` (load with `fedlatent.load_distilled`), `checkpoints/` (resume with "
              "`fedlatent distill --resume DIR`)"]
    if comparison:
        lines.append("- `baseline/`: the baseline's own run folder (metrics.csv, accuracy.png, config.json)")
    lines.append("")
    path = folder / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


__all__ = ["write_report"]
