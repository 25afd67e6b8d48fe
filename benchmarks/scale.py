"""Scaling: wall time of one FedDGM round with 4, 8, 16 clients, serial vs Ray, and Flower's overhead.

Section 1 - serial vs Ray. One FedDGM round (every client participates: local training, then the server's
per-client latent distillation, then server training on the pool and the test evaluation) through
:func:`fedlatent.apps.distill.distill_federated` on the same machine:

* ``serial``: everything in this process with ``--serial-threads`` PyTorch threads (one row per value);
* ``ray``: client updates and per-client distillations as Ray tasks (``--cpus-per-client`` CPUs and threads
  each, a local Ray instance with ``--ray-cpus`` CPUs; default all cores); server training and evaluation
  stay in this process (``torch.set_num_threads(--cpus-per-client)``, so the run is bit-identical to the
  1-thread serial run - the ``identical`` column checks it).

Ray starts once before the timings, with one warm-up job per worker that imports fedlatent (``ray_start_s`` in
the JSON); each Ray row still pays for shipping the strategy (with the generator) and the clients' data to the
workers and for the first deserialisation of the generator there. ``--repeat`` > 1 times
the same configuration again (warm workers) and the table reports the fastest repetition.

Columns: round seconds, its parts (client updates = round - distillation - server training - evaluation;
distillation; server training), the speed-up serial(1 thread) / ray, and whether the Ray run's metrics and
model equal the serial run's bit for bit.

Section 2 - Flower simulation overhead vs the in-process engine: FedAvg (``--flower-dataset``, whole) through
``fedlatent.flower.run_simulation`` (Flower's simulation engine) against :func:`fedlatent.fl.simulate` (serial)
with the same configuration; printed as "Flower not available: <reason>" when that integration is missing.

Default configuration (CPU, about 10-20 minutes on a loaded 2-core machine)::

    OMP_NUM_THREADS=1 python benchmarks/scale.py --data-root ../shared/data

Smoke run (a minute)::

    OMP_NUM_THREADS=1 python benchmarks/scale.py --dataset digits --clients 4 --train-subsample 400 \\
        --iterations 2 --syn-steps 2 --train-epochs 1 --flower-rounds 1 --out /tmp/scale --overwrite
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _common import _list, default_data_root, subsample, machine_info, run_cli, write_results  # noqa: E402
from fedlatent.data import ImageData, load_dataset  # noqa: E402
from fedlatent.fl.run import RunFolder  # noqa: E402
from fedlatent.utils import FedLatentError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-root", default=default_data_root(), help="[env FEDLATENT_DATA or ../shared/data]")
    p.add_argument("--dataset", default="fashion-mnist", help="[%(default)s]")
    p.add_argument("--image-size", type=int, default=None, help="resize (default: native; 16 for digits)")
    p.add_argument("--clients", type=_list(int), default=[4, 8, 16], help="client counts [%(default)s]")
    p.add_argument("--train-subsample", type=int, default=8000, help="training images (0: all) [%(default)s]")
    p.add_argument("--test-subsample", type=int, default=1000, help="test images (0: all) [%(default)s]")
    p.add_argument("--model", default="convnet:width=16", help="global model = surrogate [%(default)s]")
    p.add_argument("--local-epochs", type=int, default=1, help="[%(default)s]")
    p.add_argument("--ipc", type=int, default=1, help="[%(default)s]")
    p.add_argument("--iterations", type=int, default=10, help="MTT iterations per client [%(default)s]")
    p.add_argument("--syn-steps", type=int, default=8, help="[%(default)s]")
    p.add_argument("--train-epochs", type=int, default=20, help="server epochs on the pool [%(default)s]")
    p.add_argument("--serial-threads", type=_list(int), default=[1, 2], help="serial rows [%(default)s]")
    p.add_argument("--cpus-per-client", type=int, default=1, help="Ray: CPUs (= threads) per task [%(default)s]")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance [all cores]")
    p.add_argument("--ray-address", default=None, help="use this Ray cluster instead of a local instance")
    p.add_argument("--repeat", type=int, default=1, help="time every configuration this often, keep the fastest")
    p.add_argument("--flower-dataset", default="digits", help="dataset of section 2 (whole) [%(default)s]")
    p.add_argument("--flower-clients", type=_list(int), default=[4, 8, 16], help="[%(default)s]")
    p.add_argument("--flower-rounds", type=int, default=2, help="FedAvg rounds for the Flower section [%(default)s]")
    p.add_argument("--no-flower", action="store_true", help="skip section 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "scale"), help="[%(default)s]")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def feddgm_round(args, data: ImageData, clients: int, backend="serial"):
    """One FedDGM round; returns (seconds by part, result)."""
    from fedlatent.apps.distill import distill_federated

    res = distill_federated(
        data=data, exclude_public=False, out=None, progress=False, backend=backend, preset="cpu",
        clients=clients, participation=1.0, rounds=1, local_epochs=args.local_epochs, partition="dirichlet",
        alpha=0.5, model=args.model, surrogate=args.model, ipc=args.ipc, iterations=args.iterations,
        syn_steps=args.syn_steps, train_epochs=args.train_epochs, batched=False, seed=args.seed,
        dataset=args.dataset, save_artifacts=False)
    row = res.simulation.history[1]
    parts = {"round_s": row["round_s"], "distill_s": row["distill_s"], "server_train_s": row["server_train_s"]}
    return parts, res


def _eval_s(data: ImageData, res) -> float:
    """Seconds of one test evaluation of the final model (part of every round, on the server)."""
    from fedlatent.fl.client import evaluate

    t = time.perf_counter()
    evaluate(res.simulation.strategy.eval_model(), data.x_test, data.y_test, 1000)
    return time.perf_counter() - t


def _strip(history):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in history]


def same_run(a, b) -> bool:
    sa, sb = a.simulation.strategy.model.state_dict(), b.simulation.strategy.model.state_dict()
    return _strip(a.simulation.history) == _strip(b.simulation.history) and all(torch.equal(sa[k], sb[k]) for k in sa)


def best_of(repeat: int, fn):
    best = None
    for _ in range(max(1, repeat)):
        parts, res = fn()
        if best is None or parts["round_s"] < best[0]["round_s"]:
            best = (parts, res)
    return best


def _warm_worker() -> None:
    """Start a worker and import what a FedDGM job needs (kept out of the timed rounds)."""
    import importlib

    for mod in ("fedlatent.fl.methods.feddgm", "fedlatent.generators"):
        importlib.import_module(mod)
    time.sleep(1.0)  # hold the slot, so that every warm-up job gets its own worker


def section_ray(args, data: ImageData, results: list, out: Path, settings: dict, t0: float) -> None:
    from fedlatent.parallel import RayBackend

    cores = os.cpu_count() or 1
    rb = RayBackend(address=args.ray_address, cpus_per_client=args.cpus_per_client,
                    num_cpus=args.ray_cpus or (None if args.ray_address else cores), retries=0)
    t = time.perf_counter()
    rb.start()
    rb.client_map(_warm_worker, [()] * max(1, int(settings["cores"] // args.cpus_per_client)))
    settings["ray_start_s"] = time.perf_counter() - t
    print(f"Ray started in {settings['ray_start_s']:.1f} s ({rb})", flush=True)
    try:
        for k in args.clients:
            serial_ref = None
            for th in args.serial_threads:
                torch.set_num_threads(th)
                parts, res = best_of(args.repeat, lambda: feddgm_round(args, data, k))
                parts["eval_s"] = _eval_s(data, res)
                if th == max(1, args.cpus_per_client):
                    serial_ref = res
                results.append({"section": "ray", "clients": k, "mode": f"serial {th} thread(s)", **parts,
                                "accuracy": res.final_accuracy})
                print(f"  {k:>2} clients  serial {th}t  round {parts['round_s']:.1f} s", flush=True)
                write_results(out / "results.json", "scale", settings, results, t0)
            torch.set_num_threads(max(1, args.cpus_per_client))
            parts, res = best_of(args.repeat, lambda: feddgm_round(args, data, k, backend=rb))
            parts["eval_s"] = _eval_s(data, res)
            results.append({"section": "ray", "clients": k, "mode": f"ray {args.cpus_per_client} cpu/client", **parts,
                            "accuracy": res.final_accuracy,
                            "identical_to_serial": None if serial_ref is None else same_run(serial_ref, res)})
            print(f"  {k:>2} clients  ray        round {parts['round_s']:.1f} s", flush=True)
            write_results(out / "results.json", "scale", settings, results, t0)
    finally:
        rb.close()


def section_flower(args, results: list, out: Path, settings: dict, t0: float) -> None:
    """FedAvg through Flower's simulation engine vs the in-process engine, same dataset/config/seed."""
    from fedlatent.fl.simulation import simulate

    try:
        from fedlatent.flower import run_simulation as flower_run
    except Exception as e:  # noqa: BLE001 - reported, the section is skipped
        settings["flower"] = f"Flower not available: {type(e).__name__}: {e}"
        print(settings["flower"])
        return
    torch.set_num_threads(1)
    common = dict(dataset=args.flower_dataset, data_root=args.data_root, participation=1.0, model=args.model,
                  partition="dirichlet", alpha=0.5, local_epochs=args.local_epochs)
    for k in args.flower_clients:
        t = time.perf_counter()
        ref = simulate("fedavg", clients=k, rounds=args.flower_rounds, seed=args.seed, progress=False, **common)
        t_engine = time.perf_counter() - t
        try:
            t = time.perf_counter()
            fl = flower_run("fedavg", num_clients=k, rounds=args.flower_rounds, seed=args.seed,
                            ray_cpus=args.ray_cpus, **common)
            t_flower = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - reported, the section stops
            settings["flower"] = f"Flower not available: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(settings["flower"])
            return
        acc = getattr(fl, "final_accuracy", None)
        results.append({"section": "flower", "clients": k, "rounds": args.flower_rounds, "engine_s": t_engine,
                        "flower_s": t_flower, "overhead_s": t_flower - t_engine, "ratio": t_flower / t_engine,
                        "engine_accuracy": ref.final_accuracy, "flower_accuracy": acc})
        print(f"  {k:>2} clients  engine {t_engine:.1f} s  flower {t_flower:.1f} s", flush=True)
        write_results(out / "results.json", "scale", settings, results, t0)


def print_tables(results: list, settings: dict) -> None:
    rows = [r for r in results if r["section"] == "ray"]
    if rows:
        print(f"\nOne FedDGM round, {settings['dataset']} ({settings['train']} train images), {settings['model']}, "
              f"ipc {settings['ipc']}, {settings['iterations']}x{settings['syn_steps']} MTT, "
              f"{settings['train_epochs']} server epochs; {settings['cores']} cores, load avg {settings['load_avg']}")
        print(f"{'clients':>7} | {'mode':<22} | {'round s':>8} | {'clients s':>9} | {'distill s':>9} | "
              f"{'server s':>8} | {'speed-up':>8} | identical")
        for k in sorted({r["clients"] for r in rows}):
            ref = next((r["round_s"] for r in rows if r["clients"] == k and r["mode"].startswith("serial 1 ")), None)
            for r in (r for r in rows if r["clients"] == k):
                client_s = r["round_s"] - r["distill_s"] - r["server_train_s"] - r["eval_s"]
                up = f"{ref / r['round_s']:.2f}x" if ref else "-"
                ident = {None: "", True: "yes", False: "NO"}[r.get("identical_to_serial")]
                print(f"{k:>7} | {r['mode']:<22} | {r['round_s']:>8.1f} | {client_s:>9.1f} | {r['distill_s']:>9.1f} | "
                      f"{r['server_train_s']:>8.1f} | {up:>8} | {ident}")
    rows = [r for r in results if r["section"] == "flower"]
    if rows:
        print(f"\nFlower simulation vs in-process engine (serial), FedAvg on {settings['flower_dataset']}, "
              f"{rows[0]['rounds']} rounds, whole run incl. data loading (and Ray start for Flower)")
        print(f"{'clients':>7} | {'engine s':>8} | {'flower s':>8} | {'overhead s':>10} | {'ratio':>6} | "
              "accuracy engine / flower")
        for r in rows:
            fa = "-" if r["flower_accuracy"] is None else f"{r['flower_accuracy']:.4f}"
            print(f"{r['clients']:>7} | {r['engine_s']:>8.1f} | {r['flower_s']:>8.1f} | {r['overhead_s']:>10.1f} | "
                  f"{r['ratio']:>5.2f}x | {r['engine_accuracy']:.4f} / {fa}")
    elif "flower" in settings:
        print(f"\n{settings['flower']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = RunFolder.check(args.out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image_size = args.image_size or (16 if args.dataset == "digits" else None)
    data = load_dataset(args.dataset, root=args.data_root, resize=image_size)
    data = subsample(data, args.train_subsample, args.test_subsample, args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
    settings.update(train=int(len(data.y_train)), test=int(len(data.y_test)), cores=os.cpu_count(),
                    load_avg=" ".join(f"{v:.1f}" for v in os.getloadavg()), machine=machine_info())
    results: list = []
    print(f"scale benchmark: {args.dataset}, clients {args.clients}; load average {settings['load_avg']}", flush=True)
    try:
        section_ray(args, data, results, out, settings, t0)
    except FedLatentError as e:
        settings["ray"] = f"Ray section failed: {e}"
        print(settings["ray"])
    if not args.no_flower:
        section_flower(args, results, out, settings, t0)
    settings["load_avg_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    write_results(out / "results.json", "scale", settings, results, t0)
    print_tables(results, settings)
    print(f"\nload average at the end {settings['load_avg_end']}; results -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
