"""Where a FedDGM run's wall time went, read from run folders: server distillation, server training and the rest
(clients, evaluation, writing), in total and per round, with the accuracies, side by side for several runs.

Reads each folder's ``metrics.csv`` (the ``distill_s`` / ``server_train_s`` / ``wall_s`` columns of FedDGM runs),
prints a table, writes JSON and a stacked-bar PNG (one bar per run).

    python benchmarks/cell_time_split.py OUT/f9/cifar10-a0.01-feddgm OUT/head/cifar10-a0.01-s0-feddgm \\
        --labels f9d9639,head --out benchmarks/results/cell_time_split.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import run_cli  # noqa: E402
from fedlatent.errors import FedLatentError  # noqa: E402


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else 0.0


def split(run_dir: Path) -> dict:
    """Totals and per-round seconds of one run folder, its final accuracy and the mean of its last 3 rounds (%)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FedLatentError(f"{run_dir}: no metrics.csv (not a run folder)")
    rows = [r for r in csv.DictReader(path.open()) if int(r["round"]) > 0]
    if not rows or "distill_s" not in rows[0]:
        raise FedLatentError(f"{path}: no FedDGM rounds (no distill_s column)")
    wall = [_num(r["wall_s"]) for r in rows]
    per_round = [w - p for w, p in zip(wall, [0.0] + wall[:-1])]
    distill = [_num(r["distill_s"]) for r in rows]
    train = [_num(r["server_train_s"]) for r in rows]
    acc = [100 * _num(r["accuracy"]) for r in rows]
    return {"rounds": len(rows), "wall_s": wall[-1], "distill_s": sum(distill), "server_train_s": sum(train),
            "rest_s": wall[-1] - sum(distill) - sum(train), "round_s": per_round, "round_distill_s": distill,
            "round_server_train_s": train, "final_accuracy": acc[-1], "last3_accuracy": sum(acc[-3:]) / len(acc[-3:]),
            "accuracy": acc}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 4))
    bottom = [0.0] * len(labels)
    for key, name in (("distill_s", "server distillation"), ("server_train_s", "server training"),
                      ("rest_s", "clients, evaluation, writing")):
        vals = [results[k][key] for k in labels]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, k in enumerate(labels):
        ax.text(i, bottom[i], f"{bottom[i]:.0f} s\n{results[k]['final_accuracy']:.1f} %", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("wall time of the run (s)")
    ax.set_ylim(0, 1.2 * max(bottom))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.csv)")
    p.add_argument("--labels", default="", help="comma-separated names, one per run [the folder names]")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cell_time_split.json")
    a = p.parse_args()
    labels = a.labels.split(",") if a.labels else [r.name for r in a.runs]
    if len(labels) != len(a.runs):
        raise FedLatentError(f"--labels names {len(labels)} runs, {len(a.runs)} given")
    results = {lab: split(r) for lab, r in zip(labels, a.runs)}
    first = results[labels[0]]
    print(f"{'run':<28}{'wall s':>8}{'distill s':>11}{'train s':>9}{'rest s':>8}{'x first':>9}{'final %':>9}"
          f"{'last 3 %':>10}")
    for lab, r in results.items():
        print(f"{lab:<28}{r['wall_s']:>8.0f}{r['distill_s']:>11.0f}{r['server_train_s']:>9.0f}{r['rest_s']:>8.0f}"
              f"{first['wall_s'] / r['wall_s']:>9.2f}{r['final_accuracy']:>9.2f}{r['last3_accuracy']:>10.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"runs": results}, indent=2))
    png = a.out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {a.out} and {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
