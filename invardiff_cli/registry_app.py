"""``invardiff-registry`` (:data:`registry_main`), assembled from its command modules:
:mod:`.registry_commands`, :mod:`.fleet_commands` and :mod:`.schedule_commands`."""

from __future__ import annotations

from pathlib import Path

import click

from . import fleet_commands, registry_commands, schedule_commands
from .base import Main


@click.group(
    "invardiff-registry", cls=Main, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--database-url", metavar="URL", help="SQLAlchemy URL [env INVARDIFF_DATABASE_URL].")
@click.option(
    "--store-url",
    metavar="URL",
    help="s3://bucket/prefix or a directory [env INVARDIFF_STORE_URL].",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Cache of fetched plans [env INVARDIFF_CACHE_DIR; default $INVARDIFF_HOME/cache].",
)
@click.pass_context
def registry_main(
    ctx: click.Context, database_url: str | None, store_url: str | None, cache_dir: Path | None
) -> None:
    """Plan registry: publish, promote and fetch InvarDiff cache plans; calibrate on Ray.

    With no configuration everything lives under INVARDIFF_HOME (~/.invardiff): a SQLite
    database, a local object store and the cache of fetched plans. Details: docs/registry.md.

    \b
    Exit codes:
      0  ok
      1  other error
      2  usage or invalid input
      3  not found
      4  integrity check failed
      5  database or object store unreachable
      6  schema missing or not current (init, db upgrade)
      7  conflict (stale alias move, existing model alias)
      8  quality gate failed (calibrate: published, not promoted)
      9  calibration job failed (a rerun resumes)
      10 calibration job running under another driver (calibrate --no-wait)

    \b
    Signals (128 + the signal's number; the job is failed, a rerun resumes):
      130 interrupted (SIGINT, Ctrl-C)
      143 terminated (SIGTERM)
    """
    ctx.obj = {"database_url": database_url, "store_url": store_url, "cache_dir": cache_dir}


for _command in (
    registry_commands.init,
    registry_commands.db,
    registry_commands.models,
    registry_commands.publish,
    registry_commands.fetch,
    registry_commands.list_,
    registry_commands.show,
    registry_commands.promote,
    registry_commands.revoke,
    registry_commands.mark_stale,
    registry_commands.verify,
    registry_commands.index_group,
    registry_commands.gc,
    fleet_commands.calibrate,
    fleet_commands.jobs,
    schedule_commands.recalibrate,
):
    registry_main.add_command(_command)
