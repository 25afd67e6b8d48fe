"""Command-line options shared by several commands, declared once, and the one ``KEY=VALUE`` parser."""
from __future__ import annotations

import json
from typing import Callable

import click

from fedlatent.backends import BACKENDS, make_backend
from fedlatent.errors import FedLatentError


def parse_key_value(text: str, option: str = "--option") -> tuple[str, object]:
    """``KEY=VALUE`` of a repeatable option (-O): the key with dashes as underscores, the value parsed as JSON
    when it is JSON (numbers, true/false, null, lists) and kept as a string otherwise."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise FedLatentError(f"{option} {text!r} is not KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def backend_options(command: Callable) -> Callable:
    """The ``--backend`` / ``--ray-*`` options of a click command (keyword arguments backend, ray_address,
    ray_cpus_per_client, ray_gpus_per_client, ray_retries, ray_timeout; see :func:`fedlatent.backends.make_backend`)."""
    opts = [
        click.option("--backend", type=click.Choice(list(BACKENDS)), default="serial", show_default=True,
                     help="Where clients run: serial (this process, one after the other) or ray (parallel Ray tasks; "
                          "needs pip install 'fedlatent[ray]'). Same seed, same results (with as many PyTorch "
                          "threads here as --ray-cpus-per-client)."),
        click.option("--ray-address", default=None, metavar="auto|HOST:PORT|ray://HOST:PORT",
                     help="Join this Ray cluster instead of starting a local Ray instance."),
        click.option("--ray-cpus-per-client", type=click.FloatRange(0, min_open=True), default=None,
                     help="CPUs each client task declares (and PyTorch threads it uses). [default: 1]"),
        click.option("--ray-gpus-per-client", type=click.FloatRange(0), default=None,
                     help="GPUs each client task declares, e.g. 0.25 for four clients per GPU. [default: 0]"),
        click.option("--ray-retries", type=click.IntRange(0), default=None,
                     help="Retries of a failed client task (exception or worker crash; not a rejected input or "
                          "setting, which would fail again); a client that still fails is left out of its round "
                          "and recorded. [default: 1]"),
        click.option("--ray-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
                     help="Wall-clock limit of a round's client tasks (and, separately, of FedDGM's per-client "
                          "distillation tasks), counted from submission, time waiting for a free CPU/GPU included; a "
                          "task still running then is cancelled (its worker killed) and its client recorded as "
                          "failed. [default: no limit]"),
    ]
    for o in reversed(opts):
        command = o(command)
    return command


def backend_from_cli(backend: str, ray_address: str | None, ray_cpus_per_client: float | None,
                     ray_gpus_per_client: float | None, ray_retries: int | None,
                     ray_timeout: float | None = None) -> "RayBackend | None":
    """The backend the :func:`backend_options` values describe (None for serial)."""
    return make_backend(backend, ray_address, cpus_per_client=ray_cpus_per_client,
                        gpus_per_client=ray_gpus_per_client, retries=ray_retries, timeout=ray_timeout)


# ---------------------------------------------------------------------------------------------
# FL options, generated from FLConfig: every field is an option of every command that runs federated rounds

#: click type and help of the FLConfig fields that have more to say than their annotation and comment.
FL_OPTIONS: dict[str, tuple[object, str]] = {
    "clients": (click.IntRange(1), "Number of clients K the training set is split among."),
    "partition": (click.Choice(["iid", "dirichlet", "balanced-dirichlet", "pathological"]),
                  "How the training set is split: iid; dirichlet (label skew, Dir(alpha) per class); "
                  "balanced-dirichlet (DynaFed: equal client sizes); pathological (k classes per client)."),
    "alpha": (click.FloatRange(min=0, min_open=True),
              "Dirichlet concentration for the dirichlet schemes; smaller = more heterogeneous."),
    "min_size": (click.IntRange(0), "dirichlet: redraw until every client holds at least this many samples."),
    "classes_per_client": (click.IntRange(1), "pathological: number of classes each client holds."),
    "rounds": (click.IntRange(0), "Communication rounds."),
    "participation": (click.FloatRange(0, 1, min_open=True), "Fraction of clients sampled each round (at least one)."),
    "local_epochs": (click.IntRange(0), "Local epochs per round on each sampled client."),
    "lr": (click.FloatRange(min=0), "Local SGD learning rate."),
    "momentum": (click.FloatRange(min=0), "Local SGD momentum."),
    "weight_decay": (click.FloatRange(min=0), "Local SGD weight decay."),
    "batch_size": (click.IntRange(1), "Local mini-batch size."),
    "model": (str, "Global model architecture: convnet (ConvNet-D3 up to 32 px), convnet-d3/d4/d5, resnet18, vgg11, "
                   "alexnet; options as in convnet:width=64."),
    "eval_every": (click.IntRange(1), "Evaluate on the test set every k rounds (always at round 0 and the last round)."),
    "eval_batch_size": (click.IntRange(1), "Batch size of the central evaluation."),
    "seed": (int, "One seed fixes the partition, client schedule, initial weights and local shuffles."),
    "device": (str, "cpu, cuda, cuda:N or auto."),
    "norm_factor": (click.FloatRange(min=1, min_open=True),
                    "Upload screening: reject an update whose L2 norm exceeds this many times the round's median."),
    "norm_cap": (click.FloatRange(min=0, min_open=True), "Upload screening: reject an update whose L2 norm exceeds this."),
    "client_models": (str, "Heterogeneous clients (feddf, fedmd): SPEC@WEIGHT entries separated by ';' or ',', e.g. "
                           "'convnet@0.5,resnet18@0.3,vgg11@0.2' or 'convnet:width=32,depth=2@0.6;vgg11@0.4' (a spec "
                           "may carry options; '@' starts its weight). Weights are fractions summing to 1 (exact counts "
                           "by largest remainder) or client counts summing to --clients; clients get architectures "
                           "through a seeded permutation. Or a JSON file {\"client_id\": \"spec\"} naming every client. "
                           "[default: --model for every client]"),
    "public_fraction": (click.FloatRange(0, 1, max_open=True),
                        "Hold out this fraction of the training set (seeded, stratified) as public data before the "
                        "clients' partition: FedDF's transfer set (--transfer public) and FedMD's public labelled set. "
                        "Clients only get the rest."),
    "dp": (bool, "Clients train with DP-SGD (Opacus, pip install 'fedlatent[privacy]'): per-sample clipping + "
                 "Gaussian noise; per-client (epsilon, delta) in metrics.csv. Needs --dp-noise or --dp-epsilon."),
    "dp_clip": (click.FloatRange(min=0, min_open=True), "DP-SGD per-sample gradient clip (L2 norm)."),
    "dp_noise": (click.FloatRange(min=0), "DP-SGD noise multiplier sigma (noise std / clip)."),
    "dp_epsilon": (click.FloatRange(min=0, min_open=True),
                   "DP-SGD target epsilon per client over the whole run (sigma calibrated per client)."),
    "dp_delta": (click.FloatRange(0, 1, min_open=True, max_open=True), "DP-SGD delta."),
}


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line of a dataclass (its documentation when it has no other)."""
    import inspect
    import io
    import textwrap
    import tokenize

    out: dict[str, str] = {}
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return out
    name = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string
        elif tok.type == tokenize.COMMENT and name is not None:
            out.setdefault(name, tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            name = None
    return out


def fl_options(defaults=None, metavar_note: str = "", config_class: type | None = None):
    """Click options for every :class:`~fedlatent.fl.base.FLConfig` field (``--local-epochs`` for
    ``local_epochs``, ...), passed to the command as keyword arguments named by the fields.

    ``config_class``: another dataclass than FLConfig (tests). ``defaults``: an FLConfig whose values are the shown defaults (``fedlatent simulate``), or None: every
    option defaults to None, i.e. "not given" (``fedlatent distill``, whose preset decides; ``metavar_note``
    says so in the help). A field added to FLConfig becomes an option here without further code: its click
    type comes from its annotation and its help from its comment unless :data:`FL_OPTIONS` has a better one.
    """
    import dataclasses
    import typing

    from fedlatent.fl.base import FLConfig

    cls = config_class or FLConfig
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)

    def deco(command):
        for f in reversed(dataclasses.fields(cls)):
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            base = args[0] if isinstance(args[0], type) else str
            ctype, text = FL_OPTIONS.get(f.name, (base, comments.get(f.name, f.name.replace("_", " "))))
            flag = "--" + f.name.replace("_", "-")
            if defaults is None:
                kw = {"default": None, "help": text + (f" {metavar_note}" if metavar_note else "")}
            else:
                kw = {"default": getattr(defaults, f.name), "show_default": True, "help": text}
            if base is bool and ctype is bool:
                decl = [f"{flag}/--no-{f.name.replace('_', '-')}", f.name]
                command = click.option(*decl, **kw)(command)
            else:
                command = click.option(flag, f.name, type=ctype, **kw)(command)
        return command

    return deco


def fl_values(values: dict) -> dict:
    """Remove the FLConfig fields from a command's keyword arguments; returns those given (not None)."""
    from fedlatent.fl.base import FLConfig

    given = {k: values.pop(k) for k in list(values) if k in FLConfig.__dataclass_fields__}
    return {k: v for k, v in given.items() if v is not None}


def option_strings(texts, *config_classes, option: str = "-O") -> dict:
    """The ``-O KEY=VALUE`` options of a command: :func:`parse_key_value`, each value coerced to the type of the
    field of that name in ``config_classes`` (:func:`fedlatent.fl.options.coerce`)."""
    from fedlatent.fl.options import coerce

    out = {}
    for text in texts:
        k, v = parse_key_value(text, option)
        name = k.split(".", 1)[1] if k.startswith(("fl.", "method.")) else k
        classes = config_classes[1:] if k.startswith("method.") else config_classes
        for cls in classes:
            if cls is not None and name in cls.__dataclass_fields__:
                v = coerce(cls, name, v)
                break
        out[k] = v
    return out


def data_options(image_size: bool = True):
    """``--dataset``, ``--data-root`` and (optionally) ``--image-size``: the data options of every command that
    loads a dataset (:func:`fedlatent.data.load_dataset`), declared once; the command gets ``dataset``,
    ``data_root`` and ``image_size``."""

    def deco(command):
        if image_size:
            command = click.option("--image-size", type=click.IntRange(4, 512), default=None,
                                   help="Resize images to this many pixels per side. "
                                        "[default: 16 for digits, native otherwise]")(command)
        command = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                               help="Folder searched first for datasets (then $FEDLATENT_DATA, then the torchvision "
                                    "cache).")(command)
        return click.option("--dataset", default="digits", show_default=True,
                            help="digits, mnist, fashion-mnist, cifar10, cifar100, npz:/path/to/folder, or "
                                 "hf:/path/to/folder (a Hugging Face DatasetDict saved with save_to_disk, train and "
                                 "test splits).")(command)

    return deco


def progress_option(command):
    """``--no-progress`` / ``--quiet`` / ``-q``: one flag, the same meaning in every command (no progress bars);
    the command gets ``no_progress``."""
    return click.option("--no-progress", "--quiet", "-q", "no_progress", is_flag=True,
                        help="No progress bars.")(command)


def method_option(command):
    """``-O`` / ``--option KEY=VALUE`` (repeatable): any FLConfig field or option of the method (``fedlatent methods
    NAME``), the value read as JSON when it is JSON and as the field's type otherwise; the command gets
    ``options``."""
    return click.option("--option", "--method-option", "-O", "options", multiple=True, metavar="KEY=VALUE",
                        help="Any FLConfig field or method option (see `fedlatent methods NAME`), e.g. -O lr_img=100 "
                             "-O pool=all; repeatable, overrides the options above.")(command)


def log_option(command):
    """``--log csv[,tensorboard][,mlflow]``: the experiment trackers of every command that trains
    (:mod:`fedlatent.tracking`); the command gets ``log``."""
    return click.option("--log", "log", default="csv", show_default=True, metavar="csv[,tensorboard][,mlflow]",
                        help="Experiment trackers: csv (metrics.csv, always written), tensorboard (RUN/tensorboard), "
                             "mlflow (local file store RUN/mlruns, no server); extras fedlatent[tensorboard] / "
                             "fedlatent[mlflow].")(command)


def baseline_option(command):
    """``--baseline fedavg|none``: the reference run beside a method's run (same partition, initial weights and
    client schedule, through the same engine, into RUN/baseline/); the command gets ``baseline``."""
    return click.option("--baseline", type=click.Choice(["fedavg", "none"]), default=None,
                        help="Also run this method on the same partition, initial weights and client schedule (into "
                             "RUN/baseline/); accuracy.png, report.md and the summary compare the two. "
                             "[default: fedavg]")(command)


def audit_option(command):
    """``--audit``: after the run, audit its run folder (``fedlatent audit RUN_DIR``: memorisation and membership
    inference, :mod:`fedlatent.privacy.audit`); the command gets ``audit`` and calls :func:`run_audit`."""
    return click.option("--audit", "audit", is_flag=True,
                        help="After the run, audit it as `fedlatent audit RUN_DIR` does (memorisation of the "
                             "clients' images and membership inference against the global model).")(command)


def run_audit(run_dir, data_root=None, progress: bool = True) -> None:
    """The ``--audit`` step: audit ``run_dir`` and print the privacy table."""
    from fedlatent.privacy.audit import audit_run
    from fedlatent.privacy.report import privacy_markdown

    click.echo(privacy_markdown(audit_run(run_dir, data_root=data_root, progress=progress)))


def config_option(from_run=None):
    """``--config FILE`` (TOML or JSON; a run folder's config.json replays that run): place it right under
    ``@click.command``. The valid keys are the command's own options (:func:`fedlatent.configfile.option_index`),
    so an option added to the command is a config key too; ``from_run(config_json, option_names)`` maps the
    command's run-folder config.json to option values (:mod:`fedlatent.configfile`)."""
    import functools

    from fedlatent.configfile import load_file, option_index, resolve

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, config_file=None, **kwargs):
            if config_file is not None:
                ctx = click.get_current_context()
                data = load_file(config_file)
                params = {p.name: p for p in option_index(ctx.command).values()}
                values = from_run(data, params) if from_run is not None else None
                kwargs = resolve(ctx, data if values is None else values, kwargs, str(config_file))
            return fn(*args, **kwargs)

        return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                            metavar="FILE", help="Options from a TOML or JSON file (a run folder's config.json "
                                                 "replays that run); options given here win over the file, the "
                                                 "file over the preset.")(wrapper)

    return deco


__all__ = ["audit_option", "run_audit", "baseline_option", "log_option", "config_option", "parse_key_value", "backend_options", "backend_from_cli", "fl_options", "fl_values", "option_strings",
           "progress_option", "method_option"]
