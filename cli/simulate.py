"""``fedlatent simulate``: run a federated method in simulation and write a run folder."""
from __future__ import annotations

import time

import click

from fedlatent.cli._options import (audit_option, backend_from_cli, backend_options, config_option, data_options,
                                    fl_options, fl_values, log_option, method_option, option_strings, progress_option,
                                    run_audit)

from fedlatent.configfile import simulate_options
from fedlatent.fl.base import FLConfig
from fedlatent.utils import FedLatentError


@click.command("simulate")
@config_option(simulate_options)
@click.option("--method", default="fedavg", show_default=True,
              help="Federated method: fedavg, fedprox, feddf, fedmd, dynafed, feddgm, feddgm+avg, or any other "
                   "registered method (`fedlatent methods` lists them and their options).")
@data_options()
@fl_options(FLConfig())
@click.option("--mu", type=click.FloatRange(min=0), default=None,
              help="FedProx proximal coefficient mu in (mu/2)||w - w_global||^2 (fedprox only). [default: 0.01]")
@click.option("--transfer", default=None,
              help="feddf: transfer set for distillation: 'public' (the --public-fraction split, labels unused), "
                   "a distilled set 'file:PATH' / PATH.safetensors ('images' [N,C,H,W] in normalised input space, "
                   "optional 'labels'), or 'generator:NAME' (samples of a fedlatent generator). [default: public]")
@method_option
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder to write. [default: runs/<method>-<dataset>-<time>]")
@click.option("--overwrite", is_flag=True, help="Allow writing into an existing non-empty run folder.")
@audit_option
@progress_option
@log_option
@backend_options
def simulate(method, dataset, data_root, image_size, mu, transfer, options, out, overwrite, audit, no_progress, log,
             **rest) -> None:
    """Simulate federated training of one method and write a run folder.

    The run folder gets config.json, metrics.csv (one row per round; round 0 = initial evaluation),
    accuracy.png, partition.csv/png, model.safetensors (the final global model) and summary.json. Heterogeneous methods (feddf, fedmd) add
    accuracy_<arch> / loss_<arch> columns per architecture. The defaults (FedAvg, 10 clients, Dirichlet alpha 0.5,
    20 rounds, half the clients per round, ConvNet-D3 on 16 px scikit-learn digits) finish in under a minute on a
    laptop CPU. A method's options come with its defaults (`fedlatent methods NAME`); -O sets any of them.

    With --backend ray the clients run as parallel Ray tasks, each with int(--ray-cpus-per-client) PyTorch
    threads (same seed and same thread count as this process: the serial run's numbers). A client task that
    fails is retried (--ray-retries), or cancelled after --ray-timeout, and then left out of its round and
    listed in summary.json.
    """
    from fedlatent.fl.base import get_method
    from fedlatent.fl.options import config_class, split_options
    from fedlatent.fl.simulation import simulate as run

    fl = fl_values(rest)
    cls = get_method(method)
    o_fl, opts = split_options(cls, option_strings(options, FLConfig, config_class(cls)), lenient=True)
    fl.update(o_fl)
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
    backend = backend_from_cli(**rest)
    try:
        result = run(method=method, dataset=dataset, data_root=data_root, image_size=image_size, out=out,
                     overwrite=overwrite, method_options=opts, progress=not no_progress,
                     run_info={"command": "fedlatent simulate"}, backend=backend or "serial", log=log, **fl)
    finally:
        if backend is not None:
            backend.close()
    click.echo(result.line())
    from fedlatent.summary import echo_summary

    echo_summary(result.history, title=f"{result.method} summary", wall_s=result.wall_s, out_dir=result.out_dir)
    if audit:
        run_audit(result.out_dir, data_root=data_root, progress=not no_progress)


COMMANDS = [simulate]
