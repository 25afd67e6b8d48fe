"""``fedlatent simulate``: run a federated method in simulation and write a run folder."""
from __future__ import annotations

import json
import time

import click

from fedlatent.fl.base import FLConfig
from fedlatent.configfile import simulate_options, with_config
from fedlatent.parallel import backend_from_cli, click_options
from fedlatent.summary import echo_summary
from fedlatent.utils import FedLatentError

_D = FLConfig()  # option defaults come from the config dataclass, so the CLI and the API agree


def _parse_option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise FedLatentError(f"--method-option {text!r} is not KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


@click.command("simulate")
@with_config(simulate_options)
@click.option("--method", default="fedavg", show_default=True,
              help="Federated method: fedavg, fedprox, feddf, fedmd, or any other method registered in fedlatent.fl "
                   "(an unknown name lists them all).")
@click.option("--dataset", default="digits", show_default=True,
              help="digits, mnist, fashion-mnist, cifar10, cifar100, npz:/path/to/folder, or hf:/path/to/folder "
                   "(a Hugging Face DatasetDict saved with save_to_disk, train and test splits).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder searched first for datasets (then $FEDLATENT_DATA, then the torchvision cache).")
@click.option("--image-size", type=click.IntRange(4, 512), default=None,
              help="Resize images to this many pixels per side. [default: 16 for digits, native otherwise]")
@click.option("--clients", type=click.IntRange(1), default=_D.clients, show_default=True,
              help="Number of clients K the training set is split among.")
@click.option("--partition", type=click.Choice(["iid", "dirichlet", "balanced-dirichlet", "pathological"]),
              default=_D.partition, show_default=True,
              help="How the training set is split: iid; dirichlet (label skew, Dir(alpha) per class); "
                   "balanced-dirichlet (DynaFed: equal client sizes); pathological (k classes per client).")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=_D.alpha, show_default=True,
              help="Dirichlet concentration for the dirichlet schemes; smaller = more heterogeneous.")
@click.option("--min-size", type=click.IntRange(0), default=_D.min_size, show_default=True,
              help="dirichlet: redraw until every client holds at least this many samples.")
@click.option("--classes-per-client", type=click.IntRange(1), default=_D.classes_per_client, show_default=True,
              help="pathological: number of classes each client holds.")
@click.option("--rounds", type=click.IntRange(0), default=_D.rounds, show_default=True,
              help="Communication rounds.")
@click.option("--participation", type=click.FloatRange(0, 1, min_open=True), default=_D.participation,
              show_default=True, help="Fraction of clients sampled each round (at least one).")
@click.option("--local-epochs", type=click.IntRange(0), default=_D.local_epochs, show_default=True,
              help="Local epochs per round on each sampled client.")
@click.option("--lr", type=click.FloatRange(min=0), default=_D.lr, show_default=True,
              help="Local SGD learning rate.")
@click.option("--momentum", type=click.FloatRange(min=0), default=_D.momentum, show_default=True,
              help="Local SGD momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_D.weight_decay, show_default=True,
              help="Local SGD weight decay.")
@click.option("--batch-size", type=click.IntRange(1), default=_D.batch_size, show_default=True,
              help="Local mini-batch size.")
@click.option("--mu", type=click.FloatRange(min=0), default=None,
              help="FedProx proximal coefficient mu in (mu/2)||w - w_global||^2 (fedprox only). [default: 0.01]")
@click.option("--method-option", "-O", "method_options", multiple=True, metavar="KEY=VALUE",
              help="Extra method hyper-parameter (value parsed as JSON when possible); repeatable.")
@click.option("--model", default=_D.model, show_default=True,
              help="Architecture: convnet (ConvNet-D3 up to 32 px), convnet-d3/d4/d5, resnet18, vgg11, alexnet; "
                   "options as in convnet:width=64.")
@click.option("--client-models", default=None, metavar="SPEC@W;SPEC@W|FILE.json",
              help="Heterogeneous clients (feddf, fedmd): SPEC@WEIGHT entries separated by ';' or ',', e.g. "
                   "'convnet@0.5,resnet18@0.3,vgg11@0.2' or 'convnet:width=32,depth=2@0.6;vgg11@0.4' (a spec may "
                   "carry options; '@' starts its weight). Weights are fractions summing to 1 (exact counts by "
                   "largest remainder) or client counts summing to --clients; clients get architectures through a "
                   "seeded permutation. Or a JSON file {\"client_id\": \"spec\"} naming every client. "
                   "[default: --model for every client]")
@click.option("--public-fraction", type=click.FloatRange(0, 1, max_open=True), default=_D.public_fraction,
              show_default=True,
              help="Hold out this fraction of the training set (seeded, stratified) as public data before the "
                   "clients' partition: FedDF's transfer set (--transfer public) and FedMD's public labelled set. "
                   "Clients only get the rest.")
@click.option("--transfer", default=None,
              help="feddf: transfer set for distillation: 'public' (the --public-fraction split, labels unused), "
                   "a distilled set 'file:PATH' / PATH.safetensors ('images' [N,C,H,W] in normalised input space, "
                   "optional 'labels'), or 'generator:NAME' (samples of a fedlatent generator). [default: public]")
@click.option("--eval-every", type=click.IntRange(1), default=_D.eval_every, show_default=True,
              help="Evaluate on the test set every k rounds (always at round 0 and the last round).")
@click.option("--seed", type=int, default=_D.seed, show_default=True,
              help="One seed fixes the partition, client schedule, initial weights and local shuffles.")
@click.option("--device", default=_D.device, show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder to write. [default: runs/<method>-<dataset>-<time>]")
@click.option("--overwrite", is_flag=True, help="Allow writing into an existing non-empty run folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--log", "log", default="csv", show_default=True, metavar="csv[,tensorboard][,mlflow]",
              help="Experiment trackers: csv (metrics.csv, always written), tensorboard (RUN/tensorboard), mlflow "
                   "(local file store RUN/mlruns, no server); extras fedlatent[tensorboard] / fedlatent[mlflow].")
@click_options
def simulate(method, dataset, data_root, image_size, clients, partition, alpha, min_size, classes_per_client, rounds,
             participation, local_epochs, lr, momentum, weight_decay, batch_size, mu, method_options, model,
             client_models, public_fraction, transfer, eval_every, seed, device, out, overwrite, quiet, log,
             **backend_options) -> None:
    """Simulate federated training of one method and write a run folder.

    The run folder gets config.json, metrics.csv (one row per round; round 0 = initial evaluation),
    accuracy.png, partition.csv/png and summary.json. Heterogeneous methods (feddf, fedmd) add
    accuracy_<arch> / loss_<arch> columns per architecture. The defaults (FedAvg, 10 clients, Dirichlet alpha 0.5, 20 rounds, half the clients per round, ConvNet-D3 on
    16 px scikit-learn digits) finish in under a minute on a laptop CPU.

    With --backend ray the clients run as parallel Ray tasks, each with int(--ray-cpus-per-client) PyTorch
    threads (same seed and same thread count as this process: the serial run's numbers). A client task that
    fails is retried (--ray-retries), or cancelled after --ray-timeout, and then left out of its round and
    listed in summary.json.
    """
    from fedlatent.fl.simulation import simulate as run

    opts = dict(_parse_option(o) for o in method_options)
    if mu is not None:
        if method != "fedprox":
            raise FedLatentError(f"--mu applies to --method fedprox only (got --method {method})")
        opts["mu"] = mu
    if transfer is not None:
        if method != "feddf":
            raise FedLatentError(f"--transfer applies to --method feddf only (got --method {method})")
        opts["transfer"] = transfer
    if out is None:
        safe = dataset.replace(":", "_").replace("/", "_")
        out = f"runs/{method}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
    backend = backend_from_cli(**backend_options)
    try:
        result = run(
            method=method, dataset=dataset, data_root=data_root, image_size=image_size, out=out, overwrite=overwrite,
            method_options=opts, progress=not quiet, run_info={"command": "fedlatent simulate"},
            clients=clients, partition=partition, alpha=alpha, min_size=min_size, classes_per_client=classes_per_client,
            rounds=rounds, participation=participation, local_epochs=local_epochs, lr=lr, momentum=momentum,
            weight_decay=weight_decay, batch_size=batch_size, model=model, eval_every=eval_every, seed=seed,
            device=device, client_models=client_models, public_fraction=public_fraction, backend=backend or "serial",
            log=log,
        )
    finally:
        if backend is not None:
            backend.close()
    click.echo(result.line())
    echo_summary(result.history, title=f"{result.method} summary", wall_s=result.wall_s, out_dir=result.out_dir)


COMMANDS = [simulate]
