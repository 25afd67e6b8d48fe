"""Central evaluation speed against its batch size (``fedlatent.train.evaluate``, ``FLConfig.eval_batch_size``).

Times ``evaluate`` of a freshly initialised model on a seeded random test set at each batch size, interleaved
and repeated (medians), and checks that every batch size gives the same accuracy and loss. Prints a table,
writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/eval_batch.py --batch-sizes 1000,500,256,128,64 --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import _list, format_table, machine_info, run_cli  # noqa: E402
from fedlatent.errors import FedLatentError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnet-d3:width=32")
    p.add_argument("--images", type=int, default=2000, help="test images (the cell's test subset: 2000)")
    p.add_argument("--batch-sizes", type=_list(int), default=[1000, 500, 256, 128, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_batch.json")
    a = p.parse_args()
    if not a.batch_sizes or min(a.batch_sizes) < 1:
        raise FedLatentError("--batch-sizes must be positive integers")
    torch.set_num_threads(a.threads)
    from fedlatent.models import get_model, parse_model_spec
    from fedlatent.train import evaluate

    name, kw = parse_model_spec(a.model)
    model = get_model(name, 3, 10, 32, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (a.images,), generator=g)
    times = {b: [] for b in a.batch_sizes}
    metrics = {}
    for b in a.batch_sizes:  # warm-up
        metrics[b] = evaluate(model, x, y, b)
    for _ in range(a.repeats):
        for b in a.batch_sizes:
            t = time.perf_counter()
            evaluate(model, x, y, b)
            times[b].append(time.perf_counter() - t)
    med = {b: statistics.median(v) for b, v in times.items()}
    ref = a.batch_sizes[0]
    body = [[str(b), f"{med[b]:.3f}", f"{med[ref] / med[b]:.2f}", f"{100 * metrics[b]['accuracy']:.2f}",
             f"{metrics[b]['loss']:.6f}"] for b in a.batch_sizes]
    print(f"evaluate({a.model}) on {a.images} images, {a.threads} thread(s), medians of {a.repeats}")
    print(format_table(["batch", "s", f"x batch {ref}", "accuracy %", "loss"], body))
    same = all(metrics[b]["accuracy"] == metrics[ref]["accuracy"] for b in a.batch_sizes)
    print("the same accuracy at every batch size" if same else "ACCURACY DIFFERS between batch sizes")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items() if k != "out"},
                                 "machine": machine_info(), "seconds": times, "median_s": med,
                                 "metrics": metrics, "same_accuracy": same}, indent=2))
    print(f"wrote {a.out}")
    return 0 if same else 1


if __name__ == "__main__":
    run_cli(main)
