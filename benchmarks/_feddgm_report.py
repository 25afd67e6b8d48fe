"""Tables and plots of ``benchmarks/feddgm.py``: the cells' accuracies as mean +- std over seeds, the premise
check, the cross-architecture transfer, the speed line, the accuracy curves, and the issue's acceptance targets.

Run as a script it merges the ``record.json`` of grid parts run into separate ``--out`` folders::

    python benchmarks/_feddgm_report.py OUT1 OUT2 ... [--json merged.json] [--png curves.png] [--hybrid hyb-m]
        [--png-rounds premise_rounds.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _ms(values) -> str:
    """Percent, mean ± the sample standard deviation over seeds (ddof 1: two seeds are a sample, not the spread)."""
    v = [100 * x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def group(runs: list[dict]) -> dict:
    """{(dataset, alpha): {method: [run, ...]}} in first-seen order."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[(r["dataset"], r["alpha"])][r["method"]].append(r)
    return out


def print_tables(results: dict) -> None:
    runs = results["runs"]
    if runs:
        g = group(runs)
        methods = list(dict.fromkeys(r["method"] for r in runs))
        print("\nFinal accuracy (%), mean ± std over seeds [mean of the last 3 rounds]")
        print(f"{'dataset':<14}{'alpha':>6}{'seeds':>6}  " + "".join(f"{m:>28}" for m in methods))
        for (ds, alpha), per in g.items():
            seeds = max(len(v) for v in per.values())
            row = f"{ds:<14}{alpha:>6}{seeds:>6}  "
            for m in methods:
                rs = per.get(m, [])
                row += f"{'-':>28}" if not rs else \
                    f"{_ms([r['final'] for r in rs]):>17} [{_ms([r['last3'] for r in rs]):>8}]"
            print(row)
        prem = [r for r in runs if r.get("premise")]
        if prem:
            print("\nPremise check: a fresh network trained on (a) the distilled pool, (b) the generator's samples at the "
                  "initial latents, (c) a random real subset of the same size; test accuracy (%), mean ± std over seeds")
            print(f"{'dataset':<14}{'alpha':>6}  {'method':<18}{'(a) distilled':>18}{'(b) initial':>18}"
                  f"{'(c) real':>18}{'images':>8}{'|df|/|f|':>10}{'loss first->last':>20}")
            for (ds, alpha), per in group(prem).items():
                for m, rs in per.items():
                    p = [r["premise"] for r in rs]
                    fm = [x["f_move"] for x in p if x.get("f_move") is not None]
                    print(f"{ds:<14}{alpha:>6}  {m:<18}{_ms([x['distilled']['mean'] for x in p]):>18}"
                          f"{_ms([x['initial']['mean'] for x in p]):>18}"
                          f"{_ms([x['real']['mean'] for x in p if x.get('real')]):>18}{p[0]['n_images']:>8}"
                          f"{(np.mean(fm) if fm else float('nan')):>10.3f}"
                          f"{np.mean([x['loss_first'] for x in p]):>10.3f}->{np.mean([x['loss_last'] for x in p]):.3f}")
        xs = [r for r in runs if r.get("cross_arch")]
        if xs:
            print("\nCross-architecture: fresh networks trained on the method's distilled set vs a random real subset of "
                  "equal size; test accuracy (%)")
            print(f"{'dataset':<14}{'alpha':>6}  {'method':<18}{'arch':<14}{'distilled':>18}{'real subset':>18}")
            for (ds, alpha), per in group(xs).items():
                for m, rs in per.items():
                    for arch in rs[0]["cross_arch"]:
                        print(f"{ds:<14}{alpha:>6}  {m:<18}{arch:<14}"
                              f"{_ms([r['cross_arch'][arch]['distilled'] for r in rs]):>18}"
                              f"{_ms([r['cross_arch'][arch]['real'] for r in rs]):>18}")
    for s in results.get("speed", []):
        print(f"\nClient distillation speed ({s['dataset']}, {s['clients']} clients, {s['iterations']} iterations): "
              f"looped {s['looped']['s_per_iteration']:.3f} s/it, batched {s['batched']['s_per_iteration']:.3f} s/it "
              f"(batch {s['batched']['batch']}), speedup x{s['speedup']:.2f}, max |diff| {s['max_abs_diff']:.2e}")


def plt_colors(n: int) -> list:
    """``n`` distinct colours: tab10, then tab20 beyond ten methods."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_cells(runs: list[dict], path: Path) -> None:
    """Accuracy vs round of every method (mean over seeds, band = min..max), one panel per (dataset, alpha)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = group([r for r in runs if r.get("curve")])
    if not g:
        return
    methods = list(dict.fromkeys(m for per in g.values() for m in per))
    cmap = plt_colors(len(methods))
    colour = {m: cmap[i] for i, m in enumerate(methods)}  # one colour per method in every panel
    cols = min(2, len(g))
    rows = (len(g) + cols - 1) // cols
    fig = Figure(figsize=(5.6 * cols, 3.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, ((ds, alpha), per) in enumerate(g.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for m, rs in per.items():
            n = min(len(r["curve"]) for r in rs)
            if not n:
                continue
            xs = [x for x, _ in rs[0]["curve"][:n]]
            ys = np.array([[100 * a for _, a in r["curve"][:n]] for r in rs])
            line, = ax.plot(xs, ys.mean(0), marker="o", markersize=3, color=colour[m],
                            label=f"{m} ({ys[:, -1].mean():.1f})")
            if len(rs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(f"{ds}, alpha={alpha} ({max(len(v) for v in per.values())} seeds)", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def collect(folders) -> list[dict]:
    """Every ``*/record.json`` under ``folders``, one per (dataset, alpha, seed, method): a later folder's run of the
    same cell replaces an earlier one's, so a rerun part can be listed last."""
    runs: dict = {}
    for folder in folders:
        for rec_path in sorted(Path(folder).glob("*/record.json")):
            r = json.loads(rec_path.read_text())
            runs[(r["dataset"], r["alpha"], r["seed"], r["method"])] = r
    return list(runs.values())


def targets(runs: list[dict], hybrid: str = "feddgm+avg") -> list[dict]:
    """The acceptance targets of the FedDGM grid per (dataset, alpha), each as mean-over-seeds margins and per seed:
    FedDGM - FedAvg (the target, >= 10 points, at alpha 0.01 only), ``hybrid`` - max(FedAvg, FedAvg-m, DynaFed)
    (>= 0 at 0.1 and 0.5; the baselines present in the cell), and the premise margins (a) - (b) and (a) - (c) of
    FedDGM's pool."""
    out = []
    for (ds, alpha), cell in group(runs).items():
        per = {m: {r["seed"]: r for r in rs} for m, rs in cell.items()}
        row = {"dataset": ds, "alpha": alpha}
        if "feddgm" in per and "fedavg" in per:
            seeds = sorted(set(per["feddgm"]) & set(per["fedavg"]))
            gaps = [100 * (per["feddgm"][s]["final"] - per["fedavg"][s]["final"]) for s in seeds]
            row["feddgm_minus_fedavg"] = {"seeds": seeds, "per_seed": gaps, "mean": float(np.mean(gaps)),
                                          "target": 10.0 if alpha == 0.01 else None,
                                          "met": bool(np.mean(gaps) >= 10.0) if alpha == 0.01 else None}
        base = [m for m in ("fedavg", "fedavg-m", "dynafed") if m in per]
        if hybrid in per and base:
            seeds = sorted(set(per[hybrid]).intersection(*(per[m] for m in base)))
            gaps = [100 * (per[hybrid][s]["final"] - max(per[m][s]["final"] for m in base)) for s in seeds]
            mean_gap = 100 * (np.mean([per[hybrid][s]["final"] for s in seeds])
                              - max(np.mean([per[m][s]["final"] for s in seeds]) for m in base)) if seeds else None
            row["hybrid_minus_best_baseline"] = {"hybrid": hybrid, "baselines": base, "seeds": seeds,
                                                 "per_seed": gaps, "mean": None if mean_gap is None else
                                                 float(mean_gap), "met_every_seed": bool(gaps) and min(gaps) >= 0}
        prem = [r["premise"] for r in per.get("feddgm", {}).values() if r.get("premise")]
        if prem:
            a = [100 * p["distilled"]["mean"] for p in prem]
            pairs = paired_gaps(prem)
            row["premise"] = {"vs_initial": float(np.mean(a) - np.mean([100 * p["initial"]["mean"] for p in prem])),
                              "vs_real": float(np.mean(a) - np.mean([100 * p["real"]["mean"] for p in prem
                                                                     if p.get("real")] or [np.nan])),
                              "vs_initial_pairs": pairs, "pairs_above_0": sum(g > 0 for g in pairs)}
        out.append(row)
    return out


def paired_gaps(premises: list[dict]) -> list[float]:
    """(a) - (b) in points for every fresh network of every premise check, paired by training seed: the pool's and
    the initial latents' networks of one check share their seed (``--premise-seeds``), so each pair differs only
    in the training set."""
    return [100 * (d - i) for p in premises
            for d, i in zip(p["distilled"].get("accs", []), p["initial"].get("accs", []))]


def premise_rounds(runs: list[dict]) -> list[dict]:
    """The per-round premise (``--premise-every-round``) of every run that has it, per (dataset, alpha, method):
    for each round the paired gaps of all seeds' checks, with their mean, std and how many are above 0, and the
    same over every round."""
    out = []
    for (ds, alpha), cell in group([r for r in runs if r.get("premise_rounds")]).items():
        for m, rs in cell.items():
            by_round: dict = defaultdict(list)
            for r in rs:
                for row in r["premise_rounds"]:
                    by_round[row["round"]].extend(paired_gaps([row]))
            rounds = [{"round": k, "gaps": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if
                       len(v) > 1 else 0.0, "above_0": sum(g > 0 for g in v)} for k, v in sorted(by_round.items())]
            every = [g for row in rounds for g in row["gaps"]]
            out.append({"dataset": ds, "alpha": alpha, "method": m, "seeds": sorted(r["seed"] for r in rs),
                        "rounds": rounds, "mean": float(np.mean(every)), "std": float(np.std(every, ddof=1)),
                        "above_0": sum(g > 0 for g in every), "n": len(every)})
    return out


def print_premise_rounds(rows: list[dict]) -> None:
    for row in rows:
        print(f"\nPer-round premise, {row['dataset']} alpha={row['alpha']} {row['method']} (seeds "
              f"{', '.join(map(str, row['seeds']))}): pool - initial latents, paired per training seed (points)")
        for r in row["rounds"]:
            print(f"  round {r['round']:>3}: {r['mean']:+6.2f} ± {r['std']:.2f}  "
                  f"({r['above_0']} of {len(r['gaps'])} > 0)")
        print(f"  every round: {row['mean']:+6.2f} ± {row['std']:.2f}  ({row['above_0']} of {row['n']} > 0)")


def plot_premise_rounds(runs: list[dict], path: Path) -> None:
    """Pool - initial latents per round (paired gaps), one line per run seed (mean ± std over its training
    seeds), one panel per (dataset, alpha, method) with a per-round premise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = [(key, m, rs) for key, cell in group([r for r in runs if r.get("premise_rounds")]).items()
         for m, rs in cell.items()]
    if not g:
        return
    fig = Figure(figsize=(5.6 * len(g), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, ((ds, alpha), m, rs) in enumerate(g):
        ax = fig.add_subplot(1, len(g), i + 1)
        for r in sorted(rs, key=lambda r: r["seed"]):
            rows = r["premise_rounds"]
            gaps = [paired_gaps([row]) for row in rows]
            ax.errorbar([row["round"] for row in rows], [np.mean(x) for x in gaps],
                        yerr=[np.std(x, ddof=1) if len(x) > 1 else 0 for x in gaps], marker="o", capsize=3,
                        label=f"seed {r['seed']} (mean {np.mean([y for x in gaps for y in x]):+.2f})")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{ds}, alpha={alpha}, {m}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("(a) pool - (b) initial latents (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def print_targets(rows: list[dict]) -> None:
    print("\nAcceptance targets (points; mean over seeds, then per seed)")
    for row in rows:
        head = f"{row['dataset']:<14}{row['alpha']:>6}  "
        if "feddgm_minus_fedavg" in row:
            t = row["feddgm_minus_fedavg"]
            verdict = "" if t["met"] is None else f" (target +10: {'met' if t['met'] else 'missed'})"
            per_seed = ", ".join(f"{g:+.2f}" for g in t["per_seed"])
            print(head + f"FedDGM - FedAvg {t['mean']:+.2f}{verdict} per seed {per_seed}")
        if "hybrid_minus_best_baseline" in row:
            t = row["hybrid_minus_best_baseline"]
            print(head + f"{t['hybrid']} - max({', '.join(t['baselines'])}) "
                  + ("-" if t["mean"] is None else f"{t['mean']:+.2f}") + " per seed "
                  f"{', '.join(f'{g:+.2f}' for g in t['per_seed'])} "
                  f"({'met on every seed' if t['met_every_seed'] else 'not on every seed'})")
        if "premise" in row:
            p = row["premise"]
            pairs = p.get("vs_initial_pairs") or []
            print(head + f"FedDGM premise: pool - initial latents {p['vs_initial']:+.2f} "
                  f"({p.get('pairs_above_0', 0)} of {len(pairs)} paired networks > 0), "
                  f"pool - real subset {p['vs_real']:+.2f}")


def markdown(runs: list[dict]) -> str:
    """One Markdown table per dataset: a row per method, a column per alpha, cells "final ± std (seeds)"; then the
    premise check of the methods that have one (pool, initial latents, real subset, latent move)."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        rs = [r for r in runs if r["dataset"] == ds]
        alphas = sorted({r["alpha"] for r in rs})
        g = group(rs)
        lines += [f"\n**{ds}**, final accuracy (%), mean ± std over seeds (n seeds)\n",
                  "| method | " + " | ".join(f"α {a}" for a in alphas) + " |", "|---|" + "---:|" * len(alphas)]
        for m in dict.fromkeys(r["method"] for r in rs):
            cells = [g[(ds, a)].get(m, []) for a in alphas]
            lines.append(f"| {m} | " + " | ".join(f"{_ms([r['final'] for r in c])} ({len(c)})" if c else "–"
                                                 for c in cells) + " |")
        prem = [r for r in rs if r.get("premise")]
        if prem:
            lines += [f"\n**{ds}**, premise: fresh ConvNet on (a) the pool, (b) the initial latents' samples, (c) a "
                      "random real subset of the same size (%), and ‖Δf‖/‖f‖ per seed\n",
                      "| α | method | (a) pool | (b) initial | (c) real | ‖Δf‖/‖f‖ |", "|---:|---|---:|---:|---:|---:|"]
            for (_, a), per in sorted(group(prem).items(), key=lambda kv: kv[0][1]):
                for m, rr in per.items():
                    p = [r["premise"] for r in rr]
                    moves = " / ".join(f"{x['f_move']:.2f}" for x in p if x.get("f_move") is not None) or "–"
                    lines.append(f"| {a} | {m} | {_ms([x['distilled']['mean'] for x in p])} | "
                                 f"{_ms([x['initial']['mean'] for x in p])} | "
                                 f"{_ms([x['real']['mean'] for x in p if x.get('real')])} | {moves} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Merge benchmarks/feddgm.py grid parts; print tables and targets.")
    p.add_argument("folders", nargs="+", help="--out folders of benchmarks/feddgm.py (later ones win per cell)")
    p.add_argument("--json", help="write the merged runs and targets here (no machine paths)")
    p.add_argument("--png", help="write the accuracy curves here")
    p.add_argument("--png-rounds", help="write the per-round premise (--premise-every-round runs) here")
    p.add_argument("--hybrid", default="feddgm+avg", help="the method name the hybrid target checks [%(default)s]")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    a = p.parse_args(argv)
    runs = sorted(collect(a.folders), key=lambda r: (r["dataset"], r["alpha"], r["seed"]))
    if not runs:
        print(f"no record.json under {', '.join(a.folders)}", file=sys.stderr)
        return 2
    print_tables({"runs": runs})
    rows = targets(runs, a.hybrid)
    print_targets(rows)
    per_round = premise_rounds(runs)
    print_premise_rounds(per_round)
    if a.markdown:
        print(markdown(runs))
    if a.json:
        merged = {"runs": runs, "targets": rows} | ({"premise_rounds": per_round} if per_round else {})
        Path(a.json).write_text(json.dumps(merged, indent=1))
    if a.png:
        plot_cells(runs, Path(a.png))
    if a.png_rounds:
        plot_premise_rounds(runs, Path(a.png_rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
