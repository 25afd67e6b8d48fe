"""``fedlatent distill``: FedDGM end to end (clients -> server latent trajectory matching -> global model)."""
from __future__ import annotations

import click

from fedlatent.cli._options import (audit_option, backend_from_cli, backend_options, baseline_option, config_option,
                                    data_options, fl_options, fl_values, log_option, method_option, option_strings,
                                    progress_option, run_audit)
from fedlatent.configfile import distill_options
from fedlatent.utils import FedLatentError


@click.command("distill")
@config_option(distill_options)
@click.option("--preset", type=click.Choice(["cpu", "cifar10-cpu", "paper"]), default="cpu", show_default=True,
              help="cpu: digits-scale run for a laptop (5 clients, 3 rounds, ConvNet width 16, ipc 2, 20 iterations "
                   "of 8 syn_steps, lr_img 10); cifar10-cpu: the CIFAR-10 benchmark cell (10 clients, Dirichlet "
                   "0.01, 10 rounds, ConvNet-D3 width 32, lr_img 30, full DSA, the fast engines); paper: the FedDGM "
                   "reference recipe for GPUs (10 clients, Dirichlet 0.5, 20 rounds of 20 local epochs, ConvNet-D5 "
                   "width 128, ipc 10, 100 iterations of 20 syn_steps, lr_img 1000, lr_w 1, lr_lr 1e-5; server: "
                   "plain SGD lr 0.01, 1000 epochs, full DSA). "
                   "Every option below overrides the preset (`fedlatent methods feddgm` lists what each preset sets).")
@data_options()
@fl_options(None, "[default: the preset's]")
@click.option("--ipc", type=click.IntRange(1), default=None, help="Distilled images per class per client.")
@click.option("--iterations", type=click.IntRange(0), default=None, help="MTT iterations per client and round.")
@click.option("--syn-steps", type=click.IntRange(1), default=None, help="Student steps per MTT iteration.")
@click.option("--generator", default=None,
              help="Generator: a name from `fedlatent pretrained list`, a checkpoint path, or 'random[:width=64,"
                   "seed=0]' (an untrained prior). [default: the dataset's built-in generator, e.g. 'digits']")
@click.option("--space", default=None,
              help="Latent space: F<k> (features after k generator layers), W+, or pixel. [default: F_{L//3} for a "
                   "built-in generator, F5 for StyleGAN-XL]")
@click.option("--surrogate", default=None,
              help="The ConvNet clients train and the server matches, e.g. convnet:width=32 (buffer-free); the global "
                   "model is --model (the surrogate itself when equal).")
@click.option("--train-epochs", type=click.IntRange(0), default=None,
              help="Server epochs on the pooled distilled sets per round.")
@click.option("--batched/--looped", "batched", default=None,
              help="Distil the clients as one batched computation (the students as one grouped network) or one "
                   "after the other; -O 'batched=\"threads\"' runs several at a time in threads. "
                   "[default: batched on CUDA, looped on CPU]")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder. [default: runs/feddgm-DATASET-TIMESTAMP]")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty run folder (its run files are replaced).")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue a killed run from its last checkpoint (all other options come from its config.json).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=1, show_default=True,
              help="Write a checkpoint every N rounds (and after the last).")
@method_option
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for PyTorch. [default: 1 for --preset cpu on a CPU device unless $OMP_NUM_THREADS is "
                   "set (its tiny kernels gain nothing from intra-op threads, and on a busy machine two threads were "
                   "measured 10x slower than one); PyTorch's default otherwise]. With --backend ray: this process only "
                   "(server training, evaluation); the Ray tasks use int(--ray-cpus-per-client) threads each.")
@baseline_option
@click.option("--premise-epochs", type=click.IntRange(0), default=300, show_default=True,
              help="After the rounds, train a fresh global-model network for this many epochs on each of: the "
                   "distilled pool, the generator's samples at the initial latents (no MTT), and a random real subset "
                   "of the same size; the table goes into report.md and premise.json (0: skip).")
@audit_option
@progress_option
@log_option
@backend_options
def distill(preset, dataset, data_root, image_size, ipc, iterations, syn_steps, generator, space, surrogate,
            train_epochs, batched, out, overwrite, resume, checkpoint_every, options, threads, baseline, premise_epochs,
            audit, no_progress, log, **rest):
    """Federated learning through server-side latent distillation (FedDGM).

    Clients train the global surrogate locally and upload start/end weights; the server distils each client's
    trajectory into synthetic images through a generator, pools them and trains the global model. Writes
    config.json, metrics.csv, accuracy.png, grid_round{r}.png, distilled.safetensors, report.md and checkpoints/.
    With --backend ray the clients and (--looped) the per-client distillations run as parallel Ray tasks
    (--ray-cpus-per-client threads each; --threads is for this process only).
    """
    import os

    import torch

    from fedlatent.apps.distill import distill_federated
    from fedlatent.distill.mtt import tune_allocator
    from fedlatent.fl.base import FLConfig
    from fedlatent.fl.methods.feddgm import FedDGMConfig

    tune_allocator()
    fl = fl_values(rest)
    if threads is not None:
        torch.set_num_threads(threads)
    elif preset == "cpu" and not os.environ.get("OMP_NUM_THREADS") and (fl.get("device") or "cpu") == "cpu":
        torch.set_num_threads(1)
    opts = dict(fl, ipc=ipc, iterations=iterations, syn_steps=syn_steps, surrogate=surrogate, train_epochs=train_epochs)
    if batched is not None:
        opts["batched"] = batched
    if generator is not None:
        opts["generator"] = generator
    if space is not None:
        opts["space"] = space
    opts = {k: v for k, v in opts.items() if v is not None}
    opts.update(option_strings(options, FLConfig, FedDGMConfig))
    backend = backend_from_cli(**rest)
    try:
        if resume is not None:
            explicit = [k for k in opts] + (["out"] if out else []) + (["baseline"] if baseline else [])
            if explicit:
                raise FedLatentError("--resume continues a run with its own options; drop "
                                     f"{', '.join(sorted(explicit))}")
            result = distill_federated(resume=resume, progress=not no_progress, checkpoint_every=checkpoint_every,
                                       backend=backend or "serial", log=log)
        else:
            result = distill_federated(dataset=dataset, data_root=data_root, preset=preset, out=out,
                                       overwrite=overwrite, image_size=image_size, progress=not no_progress,
                                       checkpoint_every=checkpoint_every, backend=backend or "serial", log=log,
                                       baseline=baseline or "fedavg", premise_epochs=premise_epochs, **opts)
    finally:
        if backend is not None:
            backend.close()
    click.echo(result.line())
    from fedlatent.summary import echo_summary

    sim = result.simulation
    info = {} if result.resumed_from is None else {"resumed after round": result.resumed_from}
    info.update(result.comparison_info())
    info.update(result.premise_info())
    echo_summary(sim.history, title="feddgm summary", wall_s=sim.wall_s, out_dir=result.out_dir, info=info)
    if audit and result.out_dir is not None:
        run_audit(result.out_dir, data_root=data_root, progress=not no_progress)


COMMANDS = [distill]
