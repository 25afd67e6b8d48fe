"""Tables and plots of ``benchmarks/feddgm.py``: the cells' accuracies as mean +- std over seeds, the premise
check, the cross-architecture transfer, the speed line, and the accuracy curves."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _ms(values) -> str:
    v = [100 * x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


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


def plot_cells(runs: list[dict], path: Path) -> None:
    """Accuracy vs round of every method (mean over seeds, band = min..max), one panel per (dataset, alpha)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = group([r for r in runs if r.get("curve")])
    if not g:
        return
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
            line, = ax.plot(xs, ys.mean(0), marker="o", markersize=3,
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
