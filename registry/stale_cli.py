"""``invardiff-registry mark-stale``: an operator's mark that a plan needs recalibrating.

Loaded lazily by the registry's command group (see :data:`registry.cli.LAZY_COMMANDS`).
"""

from __future__ import annotations

import click

from .cli import _emit, _registry, json_option, model_option


@click.command("mark-stale")
@click.argument("plan")
@click.option("--reason", help="Why (shown by `recalibrate --due`).")
@model_option
@json_option
@click.pass_context
def mark_stale(
    ctx: click.Context, plan: str, reason: str | None, model_name: str | None, as_json: bool
) -> None:
    """Mark PLAN (a sha256 prefix; the latest plan of its target) for recalibration.

    The next `recalibrate --due` submits its target; the mark ends when a calibration of the
    target succeeds after it.
    """
    from .staleness import mark_stale as mark

    result = mark(_registry(ctx), plan, model_name, reason)
    _emit(as_json, result, f"marked v{result['version']} {result['sha256']} stale")
