"""``fedlatent eval``: train fresh networks on a distilled set and report real test accuracy."""
from __future__ import annotations

import json

import click

from fedlatent.cli._options import progress_option

from fedlatent.utils import FedLatentError


def _seeds(text: str) -> list[int]:
    try:
        out = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise FedLatentError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not out:
        raise FedLatentError("--seeds is empty")
    return out


@click.command("eval")
@click.argument("distilled", type=click.Path(exists=True))
@click.option("--arch", "archs", multiple=True, default=("convnet",), show_default=True,
              help="Architecture(s) to train (repeat): convnet, convnet-d3, resnet18, vgg11, alexnet, ...")
@click.option("--dataset", default=None, help="Real test data. [default: the data set named in the file]")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder searched first for data.")
@click.option("--epochs", type=click.IntRange(1), default=300, show_default=True, help="Training epochs per model.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="SGD learning rate (divided by 10 after half the epochs).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (one model per seed).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--no-dsa", is_flag=True, help="Train without differentiable siamese augmentation.")
@click.option("--max-test", type=click.IntRange(1), default=None, help="Evaluate on the first N test images only.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@progress_option
def eval_cmd(distilled, archs, dataset, data_root, epochs, lr, seeds, batch_size, no_dsa, max_test, json_out,
             no_progress):
    """Train fresh models of each --arch on DISTILLED and report the real test accuracy, mean +- std over --seeds.

    DISTILLED: a distilled-set file - FedDGM's distilled.safetensors, DynaFed's pseudo.safetensors (soft labels),
    fedlatent distill-pixels' distilled.safetensors, or such a file from an earlier version - or a run folder
    holding one."""
    from pathlib import Path

    from fedlatent.evaluate import evaluate_distilled, format_table
    from fedlatent.utils import atomic_write_text

    p = Path(distilled)
    if p.is_dir():
        from fedlatent.artifacts import DISTILLED_FILE, PSEUDO_FILE

        p = next((p / n for n in (DISTILLED_FILE, PSEUDO_FILE) if (p / n).is_file()), p / DISTILLED_FILE)
    res = evaluate_distilled(p, archs, dataset=dataset, data_root=data_root, epochs=epochs, lr=lr, seeds=_seeds(seeds),
                             batch_size=batch_size, dsa=not no_dsa, max_test=max_test, progress=not no_progress)
    click.echo(format_table(res))
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=2) + "\n")
    line = ", ".join(f"{a} {100 * r['mean']:.2f} +- {100 * r['std']:.2f}" for a, r in res.items())
    click.echo(f"eval {p.name} ({next(iter(res.values()))['n_images']} images): {line}")


COMMANDS = [eval_cmd]
