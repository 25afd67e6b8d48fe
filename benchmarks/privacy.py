"""Privacy benchmark: utility and membership-inference AUC per method and alpha, and utility against epsilon.

Table 1 (method x alpha): FedAvg, DynaFed and FedDGM on the same seeded subset, partition, schedule and initial
weights; final test accuracy, MIA AUC of the final global model (loss threshold, LiRA-style) and, for the
methods with a synthetic set, the memorisation audit (median nearest-neighbour ratio, near-copies).
Table 2 (utility vs epsilon): FedAvg and FedDGM with client-side DP-SGD at each target epsilon (per client, over
the whole run, delta 1e-5), next to the non-private runs of table 1.

Every run folder is audited with :func:`fedlatent.privacy.audit.audit_run` on the data the run trained on (the
subset), so the members are reconstructed from the run's partition and checked against its partition.csv.
Resumable: with --skip-existing, finished runs and audits (summary.json / privacy.json) are reused.

    OMP_NUM_THREADS=1 python benchmarks/privacy.py --datasets fashion-mnist --out OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import _list, default_data_root, machine_info, run_cli, subsample  # noqa: E402
from fedlatent.data import load_dataset  # noqa: E402
from fedlatent.fl.run import read_metrics, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=default_data_root(), help="[env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--datasets", type=_list(str), default=["fashion-mnist", "cifar10"], help="[%(default)s]")
    p.add_argument("--alphas", type=_list(float), default=[0.1, 0.01], help="[%(default)s]")
    p.add_argument("--methods", type=_list(str), default=["fedavg", "dynafed", "feddgm"], help="[%(default)s]")
    p.add_argument("--dp-methods", type=_list(str), default=["fedavg", "feddgm"], help="[%(default)s]")
    p.add_argument("--epsilons", type=_list(float), default=[8.0, 2.0], help="target epsilon per client [%(default)s]")
    p.add_argument("--dp-alphas", type=_list(float), default=[0.1, 0.01], help="alphas of table 2 [%(default)s]")
    p.add_argument("--tables", default="12", help="which tables' runs: 1, 2 or 12 [%(default)s]")
    p.add_argument("--dp-clip", type=float, default=1.0, help="[%(default)s]")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="[%(default)s]")
    p.add_argument("--clients", type=int, default=5, help="[%(default)s]")
    p.add_argument("--rounds", type=int, default=4, help="[%(default)s]")
    p.add_argument("--local-epochs", type=int, default=2, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=0.01, help="[%(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="[%(default)s]")
    p.add_argument("--model", default="convnet-d3:width=32", help="global model = FedDGM surrogate [%(default)s]")
    p.add_argument("--train-subsample", type=int, default=2000, help="[%(default)s]")
    p.add_argument("--test-subsample", type=int, default=2000, help="[%(default)s]")
    p.add_argument("--dynafed-iterations", type=int, default=30, help="[%(default)s]")
    p.add_argument("--feddgm-iterations", type=int, default=10, help="MTT iterations per client and round [%(default)s]")
    p.add_argument("--members", type=int, default=500, help="MIA members (= non-members) [%(default)s]")
    p.add_argument("--shadows", type=int, default=4, help="LiRA shadow models [%(default)s]")
    p.add_argument("--shadow-epochs", type=int, default=15, help="[%(default)s]")
    p.add_argument("--phase", choices=["train", "audit", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy"))
    p.add_argument("--results", default=None, help="results JSON [OUT/results.json]")
    p.add_argument("--merge", type=_list(str), default=None,
                   help="only print the tables of these results JSONs (runs split over several processes) and write "
                        "their union to --results")
    p.add_argument("--merge-runs", type=_list(str), default=None, help="run roots searched by --merge for privacy.json")
    p.add_argument("--skip-existing", action="store_true", help="reuse finished runs and audits in --out")
    return p.parse_args(argv)


def cells(a):
    """(dataset, alpha, method, epsilon or None) in the order they run: per alpha, table 1's cells then table 2's."""
    for name in a.datasets:
        for alpha in a.alphas:
            if "1" in a.tables:
                for m in a.methods:
                    yield name, alpha, m, None
            if "2" in a.tables and alpha in a.dp_alphas:
                for m in a.dp_methods:
                    for eps in a.epsilons:
                        yield name, alpha, m, eps


def run_one(a, data, name, alpha, method, eps, run_dir: Path) -> None:
    from fedlatent.apps.distill import distill_federated
    from fedlatent.fl.simulation import simulate

    common = dict(clients=a.clients, participation=1.0, rounds=a.rounds, local_epochs=a.local_epochs, lr=a.lr,
                  momentum=0.0, weight_decay=0.0, batch_size=a.batch_size, model=a.model, partition="dirichlet",
                  alpha=alpha, seed=a.seed, device="cpu")
    if eps is not None:
        common.update(dp=True, dp_epsilon=eps, dp_clip=a.dp_clip, dp_delta=a.dp_delta)
    if method == "feddgm":
        distill_federated(data=data, preset="cpu", out=run_dir, overwrite=True, progress=False, exclude_public=False,
                          baseline="none",
                          surrogate=a.model, iterations=a.feddgm_iterations, **common)
    elif method == "dynafed":
        simulate("dynafed", dataset=name, data=data, out=run_dir, overwrite=True, progress=False,
                 method_options={"synth_round": max(3, a.rounds // 2), "iterations": a.dynafed_iterations,
                                 "ipc": 10, "progress": False}, **common)
    else:
        simulate(method, dataset=name, data=data, out=run_dir, overwrite=True, progress=False, **common)


def main(argv=None) -> int:
    from fedlatent.apps.distill import private_training_data
    from fedlatent.generators.resolve import default_generator
    a = parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge if Path(f).is_file()]
        rows = [r for part in parts for r in part["rows"]]
        for r in rows:  # the chance level of the memorisation ratio, from the runs' privacy.json when at hand
            for root in a.merge_runs or []:
                pj = Path(root) / r["run"] / "privacy.json"
                if pj.is_file() and (json.loads(pj.read_text()).get("memorisation") or {}):
                    mem = json.loads(pj.read_text())["memorisation"]
                    r["control_pixel"] = mem["pixel"]["control_ratio_median"]
                    r["control_feature"] = mem["feature"]["control_ratio_median"]
        if a.results:
            write_json(Path(a.results), {**parts[0], "rows": rows, "merged": len(parts)})
        print_tables(rows)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args = {k: (v if k not in ("out", "data_root") else k.upper()) for k, v in vars(a).items()}  # no local paths
    results = {"benchmark": "privacy", "args": args, "machine": machine_info(), "rows": []}
    results_path = Path(a.results) if a.results else out / "results.json"
    datas = {}
    for name, alpha, method, eps in cells(a):
        if name not in datas:
            data = load_dataset(name, root=a.data_root)
            # Every method trains on the same data: the training set without the generator's public split.
            data, _ = private_training_data(data, default_generator(data.name))
            datas[name] = subsample(data, a.train_subsample, a.test_subsample, a.seed)
        data = datas[name]
        tag = f"{name}-a{alpha}-{method}" + (f"-eps{eps:g}" if eps is not None else "")
        run_dir = out / tag
        t = time.perf_counter()
        if a.phase in ("train", "all") and not (a.skip_existing and (run_dir / "summary.json").is_file()):
            run_one(a, data, name, alpha, method, eps, run_dir)
            print(f"{tag}: trained ({time.perf_counter() - t:.0f} s)", flush=True)
        if not (run_dir / "summary.json").is_file():
            continue
        summ = json.loads((run_dir / "summary.json").read_text())
        row = {"dataset": name, "alpha": alpha, "method": method, "epsilon": eps, "final": summ["final_accuracy"],
               "best": summ["best_accuracy"], "train_wall_s": summ["wall_s"], "run": tag}
        last = read_metrics(run_dir / "metrics.csv")[-1]
        if eps is not None:
            row["epsilon_max_spent"] = last.get("dp_epsilon_max")
            row["sigma_max"] = last.get("dp_sigma_max")
        if a.phase in ("audit", "all"):
            pj = run_dir / "privacy.json"
            if not (a.skip_existing and pj.is_file()):
                from fedlatent.privacy.audit import audit_run

                t = time.perf_counter()
                audit_run(run_dir, data=data, members=a.members, shadows=a.shadows, shadow_epochs=a.shadow_epochs,
                          seed=a.seed, progress=False)
                print(f"{tag}: audited ({time.perf_counter() - t:.0f} s)", flush=True)
            rep = json.loads(pj.read_text())
            mia = rep.get("mia", {})
            row.update({f"{k}_auc": v["auc"] for k, v in mia.get("attacks", {}).items()})
            row.update({f"{k}_tpr1": v["tpr_at_1fpr"] for k, v in mia.get("attacks", {}).items()})
            mem = rep.get("memorisation")
            if mem:
                row["mem_ratio_median_pixel"] = mem["pixel"]["ratio_median"]
                row["mem_ratio_median_feature"] = mem["feature"]["ratio_median"]
                row["near_copies"] = mem["near_copies"]
                row["synthetic"] = mem["n_synthetic"]
        results["rows"].append(row)
        results["total_wall_s"] = time.perf_counter() - t0
        write_json(results_path, results)
    print_tables(results["rows"])
    return 0


def _f(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def print_tables(rows: list[dict]) -> None:
    t1 = [r for r in rows if r["epsilon"] is None]
    print("\n| dataset | α | method | final acc % | MIA AUC loss / conf / LiRA | TPR@1%FPR LiRA | NN ratio pixel / feature "
          "(median; control) | near-copies |")
    print("|---|---:|---|---:|---|---:|---|---:|")
    for r in t1:
        ctl = (f" ({_f(r.get('control_pixel'), '.2f')} / {_f(r.get('control_feature'), '.2f')})"
               if "control_pixel" in r else "")
        mem = (f"{_f(r.get('mem_ratio_median_pixel'), '.2f')} / {_f(r.get('mem_ratio_median_feature'), '.2f')}{ctl}"
               if "synthetic" in r else "– (no synthetic set)")
        nc = f"{r['near_copies']} / {r['synthetic']}" if "synthetic" in r else "–"
        print(f"| {r['dataset']} | {r['alpha']} | {r['method']} | {100 * r['final']:.2f} | {_f(r.get('loss_auc'))} / "
              f"{_f(r.get('confidence_auc'))} / {_f(r.get('lira_auc'))} | {_f(r.get('lira_tpr1'))} | {mem} | {nc} |")
    print("\n| dataset | α | method | ε target (spent, max over clients) | σ (max) | final acc % | MIA AUC loss / LiRA |")
    print("|---|---:|---|---|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["dataset"], r["alpha"], r["method"], -(r["epsilon"] or 1e9))):
        if r["method"] not in ("fedavg", "feddgm"):
            continue
        e = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:g} ({_f(r.get('epsilon_max_spent'), '.2f')})"
        print(f"| {r['dataset']} | {r['alpha']} | {r['method']} | {e} | {_f(r.get('sigma_max'), '.2f')} | "
              f"{100 * r['final']:.2f} | {_f(r.get('loss_auc'))} / {_f(r.get('lira_auc'))} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_cli(main)
