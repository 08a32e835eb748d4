"""The registry's commands of ``invardiff-registry``: schema, models, plans (publish, fetch,
list, show, promote, revoke, mark-stale), verify, index and gc (see docs/registry.md).

Only click and light registry modules at module level: database and S3 code load when a
command runs.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from registry.matching import LATEST, READY, Query, Resolution
from registry.validation import MAX_MIN_AGE, MAX_PRESIGN_SECONDS
from workers.pipelines import check_checkpoint, is_local

from .base import (
    FINITE,
    RESOLUTION,
    STEPS,
    command,
    config,
    emit,
    group,
    json_option,
    log,
    open_registry,
)


# ---- schema ------------------------------------------------------------------------------
@command()
@json_option
@click.pass_context
def init(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the schema and register the built-in models."""
    result = open_registry(ctx, create=True, check_schema=False).init()
    added = ", ".join(result["models_added"]) or "none"
    emit(as_json, result, f"schema at {result['revision']}; built-in models added: {added}")


@group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@json_option
@click.pass_context
def db_upgrade(ctx: click.Context, as_json: bool) -> None:
    """Upgrade the schema to this tool's revision."""
    from registry import db as database

    registry = open_registry(ctx, create=True, check_schema=False)
    revision = database.upgrade(registry.engine)
    emit(as_json, {"revision": revision}, f"schema at {revision}")


@db.command("current")
@json_option
@click.pass_context
def db_current(ctx: click.Context, as_json: bool) -> None:
    """Show the database's schema revision and the one this tool needs."""
    from registry import db as database

    registry = open_registry(ctx, check_schema=False)
    current = database.current_revision(registry.engine)
    data = {
        "current": current,
        "head": database.SCHEMA_REVISION,
        "up_to_date": current == database.SCHEMA_REVISION,
    }
    emit(as_json, data, f"current {current or 'none'}, head {database.SCHEMA_REVISION}")


# ---- models ------------------------------------------------------------------------------
@group()
def models() -> None:
    """Model aliases: a name -> checkpoint source, revision and pipeline defaults."""


@models.command("add")
@click.argument("name")
@click.argument("source")
@click.option("--revision", help="Exact checkpoint revision (commit hash).")
@click.option(
    "--arch",
    type=click.Choice(["dit", "flux"]),
    help="Architecture (guessed from SOURCE if it says; --update keeps the alias's).",
)
@click.option("--pipeline", help="Default pipeline class.")
@click.option("--scheduler", help="Default scheduler class.")
@click.option("--scheduler-config-hash", help="Default scheduler config hash.")
@click.option("--steps", type=STEPS, help="Default step count.")
@click.option("--resolution", type=RESOLUTION, help="Default resolution.")
@click.option("--guidance", type=FINITE, help="Default guidance scale.")
@click.option("--dtype", help="Default dtype (float32, bfloat16, ...).")
@click.option(
    "--update",
    is_flag=True,
    help="Change an existing alias (e.g. repoint its revision): only the options given.",
)
@json_option
@click.pass_context
def models_add(
    ctx: click.Context,
    name: str,
    source: str,
    arch: str | None,
    resolution: Resolution | None,
    update: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Register model alias NAME for checkpoint SOURCE (builtin://NAME, hf://org/model, or a
    local diffusers folder, which must be loadable: model index, pipeline class, weights)."""
    revision = settings.pop("revision")
    if is_local(source):
        check_checkpoint(source, revision)  # what calibrate checks, before registering (exit 2)
    if resolution is not None:
        settings.update(height=resolution.height, width=resolution.width)
    model = open_registry(ctx).add_model(name, source, revision, arch, settings, update=update)
    emit(as_json, model.to_json(), model.describe())


@models.command("list")
@json_option
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List model aliases."""
    models = open_registry(ctx).models()
    emit(
        as_json,
        [m.to_json() for m in models],
        "\n".join(m.describe() for m in models) or "no models",
    )


@models.command("show")
@click.argument("name")
@json_option
@click.pass_context
def models_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one model alias."""
    model = open_registry(ctx).model(name).to_json()
    emit(as_json, model, "\n".join(f"{k}: {v}" for k, v in model.items()))


# ---- plans -------------------------------------------------------------------------------
@command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", "model_name", required=True, help="Model alias the plan is for.")
@click.option(
    "--resolution",
    type=RESOLUTION,
    required=True,
    help="1024 or WIDTHxHEIGHT; must match the plan.",
)
@click.option("--steps", type=STEPS, help="Step count; must match the plan.")
@json_option
@click.pass_context
def publish(
    ctx: click.Context,
    file: Path,
    model_name: str,
    resolution: Resolution,
    steps: int | None,
    as_json: bool,
) -> None:
    """Register plan FILE (native or a reference cache book) for a model.

    Publishing the same bytes again returns the existing version.
    """
    result = open_registry(ctx).publish(file, model_name, resolution, steps)
    log(f"stored {result.version.object_key} ({result.version.size} bytes)")
    state = "published" if result.created else "already published"
    if result.version.status != READY:
        state += f" ({status_mark(result.version.status)}: it is not served)"
    human = f"{state}: {model_name} {result.target.describe()} v{result.version.version} {result.version.sha256}"
    emit(as_json, result.to_json(), human)


@command()
@click.argument("model")
@click.argument("resolution", type=RESOLUTION)
@click.option("--steps", type=STEPS, help="Step count (default: the model's).")
@click.option("--scheduler", help="Scheduler class (default: the model's).")
@click.option(
    "--alias", default=LATEST, show_default=True, help="Version alias: latest, production, ..."
)
@click.option(
    "--allow-nearest", is_flag=True, help="Accept the nearest resolution of the same aspect ratio."
)
@click.option("--pipeline", help="Pipeline class (default: prefer the model's).")
@click.option("--guidance", type=FINITE, help="Guidance scale (default: prefer the model's).")
@click.option("--dtype", help="dtype (default: prefer the model's).")
@click.option(
    "--scheduler-config-hash", help="Scheduler config hash (default: prefer the model's)."
)
@click.option(
    "--dest", type=click.Path(path_type=Path, file_okay=False), help="Also copy the plan into DIR."
)
@click.option("--refresh", is_flag=True, help="Re-resolve even if the query is cached.")
@click.option(
    "--index", "use_index", is_flag=True, help="Resolve from the store's index, not the database."
)
@json_option
@click.pass_context
def fetch(
    ctx: click.Context,
    model: str,
    resolution: Resolution,
    dest: Path | None,
    refresh: bool,
    use_index: bool,
    as_json: bool,
    **fields: Any,
) -> None:
    """Get the plan for MODEL at RESOLUTION (1024 or WIDTHxHEIGHT) into the local cache.

    Prints the plan's local path on stdout and how it matched on stderr.
    """
    from registry.client import fetch_plan

    query = Query(model=model, resolution=resolution, **fields)
    result = fetch_plan(query, config(ctx), refresh=refresh, use_index=use_index, dest=dest)
    matched = result.to_json()["resolution"]
    asked = f" (asked {result.requested})" if matched != result.requested else ""
    how = "from cache" if result.cached else "resolved"
    if "offline" in result.stale_reasons:
        how = "from cache (stale: the registry is unreachable)"
    if "revision_changed" in result.stale_reasons:
        how += (
            f" (stale: {model} is at revision {result.model_revision}, which has no plan under "
            f"{result.selected_by}; serving revision {result.target['revision']}'s)"
        )
    log(
        f"{result.match} match: {model} {matched}{asked}, {result.target['steps']} steps, "
        f"v{result.version} ({result.selected_by}), {how}"
    )
    emit(as_json, result.to_json(), str(result.path))


@command("list")
@click.option("--model", "model_name", help="Only this model's plans.")
@json_option
@click.pass_context
def list_(ctx: click.Context, model_name: str | None, as_json: bool) -> None:
    """List plan versions."""
    rows = open_registry(ctx).versions(model_name)
    lines = [
        (
            f"{','.join(r['models']):<16} {r['resolution']:>10} {r['target']['steps']:>4} steps  "
            f"{r['target']['scheduler'] or '-':<32} v{r['version']:<3} {r['sha256'][:12]}  "
            + ",".join([*(["latest"] if r["latest"] else []), *r["aliases"], *_marks(r["status"])])
            + _measured(r["metrics"])
        ).rstrip()
        for r in rows
    ]
    emit(as_json, rows, "\n".join(lines) or "no plans")


def status_mark(status: str) -> str:
    """How humans see a version's status: ``REVOKED``, ``FAILED-GATE``, ``ready``."""
    return status if status == READY else status.upper().replace("_", "-")


def _marks(status: str) -> list[str]:
    return [] if status == READY else [status_mark(status)]


def _measured(metrics: dict[str, Any]) -> str:
    """`` measured 2.5x, 34.9 dB`` for versions validated by ``calibrate``."""
    if "measured_speedup" not in metrics:
        return ""
    psnr = metrics.get("psnr_db")
    return f"  measured {metrics['measured_speedup']}x, {'inf' if psnr is None else psnr} dB"


model_option = click.option(
    "--model",
    "model_name",
    help="Model alias whose checkpoint the plan is for (when the same plan serves several).",
)


@command()
@click.argument("plan")
@model_option
@click.option("--presign", is_flag=True, help="Add a time-limited download URL (S3 stores).")
@click.option(
    "--expires",
    type=click.IntRange(min=1, max=MAX_PRESIGN_SECONDS),
    default=3600,
    show_default=True,
    help="URL lifetime, s.",
)
@json_option
@click.pass_context
def show(
    ctx: click.Context,
    plan: str,
    model_name: str | None,
    presign: bool,
    expires: int,
    as_json: bool,
) -> None:
    """Show plan PLAN (a sha256 prefix of at least 6 hex digits): target, metrics, lineage."""
    from invardiff.display import render

    registry = open_registry(ctx)
    data = registry.show(plan, model_name)
    if presign:
        data["url"] = registry.store.presign(data["object_key"], expires)
    emit(as_json, data, render({**data, "status": status_mark(data["status"])}))


@command()
@click.argument("plan")
@click.option("--alias", required=True, help="Alias to move (e.g. production).")
@click.option(
    "--expect", type=click.IntRange(min=0), help="Lock version last read (0: alias must be new)."
)
@model_option
@json_option
@click.pass_context
def promote(
    ctx: click.Context,
    plan: str,
    alias: str,
    expect: int | None,
    model_name: str | None,
    as_json: bool,
) -> None:
    """Point ALIAS of the plan's target at PLAN (optimistic locking)."""
    result = open_registry(ctx).promote(plan, alias, expect, model_name)
    previous = result["previous_version"]
    moved = f"from v{previous} " if previous else ""
    emit(
        as_json,
        result,
        f"{alias} moved {moved}to v{result['version']} (lock version {result['lock_version']})",
    )


@command()
@click.argument("plan")
@model_option
@json_option
@click.pass_context
def revoke(ctx: click.Context, plan: str, model_name: str | None, as_json: bool) -> None:
    """Take plan PLAN out of service for good: never served by fetch, the index or latest."""
    result = open_registry(ctx).revoke(plan, model_name)
    state = "revoked" if result["changed"] else "already revoked"
    on = (
        f"; aliases still on it (not served): {', '.join(result['aliases'])}"
        if result["aliases"]
        else ""
    )
    emit(as_json, result, f"{state}: v{result['version']} {result['sha256']}{on}")


@command()
@json_option
@click.pass_context
def verify(ctx: click.Context, as_json: bool) -> None:
    """Re-hash every stored plan object and check every model's index against the database.

    Exit 4 when an object is missing or corrupt, or an index is missing or stale
    (`index rebuild` repairs indexes).
    """
    result = open_registry(ctx).verify()
    lines = [f"{f['problem']}: {f['object_key']}" for f in result["failures"]]
    emit(as_json, result, "\n".join([*lines, f"{result['ok']}/{result['checked']} objects ok"]))
    if result["failures"]:
        from registry.errors import IntegrityFailure

        raise IntegrityFailure(
            f"{len(result['failures'])} stored plans or indexes failed verification "
            f"({result['checked']} plans, {result['indexes_checked']} indexes checked)"
        )


@group("index")
def index_group() -> None:
    """The per-model index objects that store-only clients resolve through."""


@index_group.command("rebuild")
@json_option
@click.pass_context
def index_rebuild(ctx: click.Context, as_json: bool) -> None:
    """Rewrite every index that is missing or does not match the database."""
    result = open_registry(ctx).check_indexes(rebuild=True)
    human = f"rewrote {len(result['rewritten'])} of {result['checked']} indexes"
    emit(as_json, result, "\n".join([*(f"rewrote {k}" for k in result["rewritten"]), human]))


@command()
@click.option(
    "--min-age",
    type=click.IntRange(min=0, max=int(MAX_MIN_AGE.total_seconds())),
    default=3600,
    show_default=True,
    help="Keep unreferenced objects younger than this (seconds): in-flight publishes.",
)
@click.option(
    "--failed-job-age",
    type=click.IntRange(min=0, max=int(MAX_MIN_AGE.total_seconds())),
    default=7 * 86400,
    show_default=True,
    help="Delete the statistics of calibration jobs that failed longer ago (seconds).",
)
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@json_option
@click.pass_context
def gc(ctx: click.Context, min_age: int, failed_job_age: int, dry_run: bool, as_json: bool) -> None:
    """Delete stored plan objects that no version references, and old failed jobs' statistics."""
    result = open_registry(ctx).gc(
        timedelta(seconds=min_age), dry_run, failed_job_age=timedelta(seconds=failed_job_age)
    )
    verb = "would delete" if dry_run else "deleted"
    counts = (
        f"{len(result['deleted'])} objects, {len(result['temporaries'])} temporary files, "
        f"{len(result['job_objects'])} statistics of {len(result['failed_jobs'])} failed jobs"
    )
    emit(as_json, result, f"{verb} {counts} ({result['freed_bytes']} bytes)")


@command("mark-stale")
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
    from registry.staleness import mark_stale as mark

    result = mark(open_registry(ctx), plan, model_name, reason)
    emit(as_json, result, f"marked v{result['version']} {result['sha256']} stale")
