"""``fedlatent audit RUN_DIR``: memorisation and membership-inference audit of a finished run folder."""
from __future__ import annotations

import click

from fedlatent.cli._options import progress_option


@click.command("audit")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder searched first for the run's dataset. [default: the run's recorded data root, then "
                   "$FEDLATENT_DATA]")
@click.option("--members", type=click.IntRange(10), default=1000, show_default=True,
              help="Members (client training images) attacked, and as many held-out non-members.")
@click.option("--shadows", type=click.IntRange(0), default=4, show_default=True,
              help="Shadow models of the LiRA-style attack (0: threshold attacks only).")
@click.option("--shadow-epochs", type=click.IntRange(1), default=15, show_default=True,
              help="Training epochs of each shadow model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the member sample, shadows, extractor.")
@progress_option
def audit(run_dir, data_root, members, shadows, shadow_epochs, seed, no_progress) -> None:
    """Audit what RUN_DIR's synthetic set and global model reveal about the clients' training images.

    Members and the partition are reconstructed from config.json and checked against partition.csv. Writes
    privacy.json, privacy.md, closest_pairs.png (synthetic sets) and a Privacy section in report.md; see
    fedlatent.privacy.audit.
    """
    from fedlatent.privacy.audit import audit_run
    from fedlatent.privacy.report import privacy_markdown

    rep = audit_run(run_dir, data_root=data_root, members=members, shadows=shadows, shadow_epochs=shadow_epochs,
                    seed=seed, progress=not no_progress)
    click.echo(privacy_markdown(rep))


COMMANDS = [audit]
