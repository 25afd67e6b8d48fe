"""Privacy options shared by ``simulate`` and ``distill``: client-side DP-SGD settings and ``--audit``."""
from __future__ import annotations

import click

NAMES = ("dp", "dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "audit")


def privacy_options(f):
    """Add --dp, --dp-clip, --dp-noise, --dp-epsilon, --dp-delta and --audit to a command."""
    opts = [
        click.option("--dp", is_flag=True, help="Clients train with DP-SGD (Opacus): per-sample clipping + Gaussian "
                     "noise; per-client (epsilon, delta) in metrics.csv. Needs --dp-noise or --dp-epsilon."),
        click.option("--dp-clip", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="DP-SGD per-sample gradient clip (L2)."),
        click.option("--dp-noise", type=click.FloatRange(min=0), default=None,
                     help="DP-SGD noise multiplier sigma (noise std / clip)."),
        click.option("--dp-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Target epsilon per client over the whole run (sigma calibrated per client)."),
        click.option("--dp-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5,
                     show_default=True, help="DP delta."),
        click.option("--audit", is_flag=True, help="After the run, audit it (fedlatent audit RUN_DIR: memorisation "
                     "and membership inference)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def pop_privacy(kwargs: dict) -> tuple[dict, bool]:
    """Split the privacy options off a command's kwargs: (FLConfig dp fields set by the user, audit flag)."""
    vals = {k: kwargs.pop(k) for k in NAMES}
    audit = bool(vals.pop("audit"))
    if not vals["dp"]:
        if vals["dp_noise"] is not None or vals["dp_epsilon"] is not None:
            from fedlatent.utils import FedLatentError

            raise FedLatentError("--dp-noise / --dp-epsilon need --dp")
        return {}, audit
    return vals, audit


def run_audit(run_dir, data_root=None, progress: bool = True) -> None:
    from fedlatent.privacy.audit import audit_run
    from fedlatent.privacy.report import privacy_markdown

    click.echo(privacy_markdown(audit_run(run_dir, data_root=data_root, progress=progress)))
