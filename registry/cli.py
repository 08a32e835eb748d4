"""``invardiff-registry``: manage and fetch cache plans (see docs/registry.md).

Reporting commands take ``--json``: JSON on stdout only, logs on stderr. Every failure is
one line on stderr and a documented exit code (:mod:`registry.errors`); ``INVARDIFF_DEBUG=1``
shows tracebacks. Only click and light modules are imported up front, so ``--help`` and a
cached ``fetch`` stay fast; database and S3 code load when a command needs them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from .config import Config
from .errors import GENERIC, USAGE, RegistryError
from .matching import LATEST, READY, Query, Resolution
from .validation import MAX_MIN_AGE, MAX_PRESIGN_SECONDS, MAX_STEPS, mask_secrets, url_secrets

PROG = "invardiff-registry"


class _ResolutionType(click.ParamType):
    name = "RESOLUTION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Resolution:
        if isinstance(value, Resolution):
            return value
        try:
            return Resolution.parse(value)
        except RegistryError as exc:
            self.fail(str(exc), param, ctx)


class _FiniteFloat(click.ParamType):
    """A float that is a real number: ``nan`` and ``inf`` are refused."""

    name = "FLOAT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


RESOLUTION = _ResolutionType()
STEPS = click.IntRange(min=1, max=MAX_STEPS)
FINITE = _FiniteFloat()


# Commands defined outside the registry (the fleet), imported only when named or listed.
LAZY_COMMANDS = {
    "calibrate": "workers.cli:calibrate",
    "jobs": "workers.cli:jobs",
    "mark-stale": "registry.stale_cli:mark_stale",
    "recalibrate": "workers.schedule_cli:recalibrate",
}


class _Main(click.Group):
    """The group whose ``main`` turns every failure into one stderr line and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        import importlib

        module, _, attribute = LAZY_COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        debug = os.environ.get("INVARDIFF_DEBUG", "") not in ("", "0")
        args = list(sys.argv[1:] if args is None else args)
        _SECRETS[:] = _secrets(args)
        try:
            result = super().main(
                args, prog_name or PROG, complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else PROG
            _fail(f"{where}: error: {exc.format_message()} (see --help)", USAGE)
        except click.ClickException as exc:
            _fail(f"{PROG}: error: {exc.format_message()}", exc.exit_code)
        except click.Abort:
            _fail(f"{PROG}: aborted", GENERIC)
        except RegistryError as exc:
            if debug:
                _traceback()
            _fail(f"{PROG}: error: {exc}", exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            if debug:
                _traceback()
            _fail(
                f"{PROG}: error: unexpected {type(exc).__name__}: {exc} (INVARDIFF_DEBUG=1 shows more)",
                GENERIC,
            )
        sys.exit(result if isinstance(result, int) else 0)


_SECRETS: list[str] = []  # passwords in this run's URLs: never printed


def _secrets(args: list[str]) -> list[str]:
    """The passwords in the database and S3 endpoint URLs of this run (flags and environment)."""
    urls = [os.environ.get("INVARDIFF_DATABASE_URL"), os.environ.get("INVARDIFF_S3_ENDPOINT_URL")]
    for i, arg in enumerate(args):
        if arg == "--database-url" and i + 1 < len(args):
            urls.append(args[i + 1])
        elif arg.startswith("--database-url="):
            urls.append(arg.partition("=")[2])
    return [secret for url in urls for secret in url_secrets(url)]


def _traceback() -> None:
    """INVARDIFF_DEBUG: the traceback, with credentials masked like every message."""
    import traceback

    click.echo(mask_secrets(traceback.format_exc(), _SECRETS).rstrip(), err=True)


def _fail(message: str, code: int) -> None:
    click.echo(mask_secrets(" ".join(message.split()), _SECRETS), err=True)
    sys.exit(code)


def _emit(as_json: bool, data: Any, human: str | None = None) -> None:
    """JSON on stdout, or the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif human is not None:
        click.echo(human)


def _log(message: str) -> None:
    click.echo(message, err=True)


def _config(ctx: click.Context) -> Config:
    """The configuration, resolved when a command runs (so ``COMMAND --help`` always works)."""
    return Config.from_env(**ctx.obj)


def _registry(ctx: click.Context, create: bool = False, check_schema: bool = True):
    from .service import Registry

    return Registry.open(_config(ctx), create=create, check_schema=check_schema)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON on stdout (logs go to stderr)."
)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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
def main(
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
    """
    ctx.obj = {"database_url": database_url, "store_url": store_url, "cache_dir": cache_dir}


# ---- schema ------------------------------------------------------------------------------
@main.command()
@json_option
@click.pass_context
def init(ctx: click.Context, as_json: bool) -> None:
    """Create or upgrade the schema and register the built-in models."""
    result = _registry(ctx, create=True, check_schema=False).init()
    added = ", ".join(result["models_added"]) or "none"
    _emit(as_json, result, f"schema at {result['revision']}; built-in models added: {added}")


@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@json_option
@click.pass_context
def db_upgrade(ctx: click.Context, as_json: bool) -> None:
    """Upgrade the schema to this tool's revision."""
    from . import db as database

    registry = _registry(ctx, create=True, check_schema=False)
    revision = database.upgrade(registry.engine)
    _emit(as_json, {"revision": revision}, f"schema at {revision}")


@db.command("current")
@json_option
@click.pass_context
def db_current(ctx: click.Context, as_json: bool) -> None:
    """Show the database's schema revision and the one this tool needs."""
    from . import db as database

    registry = _registry(ctx, check_schema=False)
    current = database.current_revision(registry.engine)
    data = {
        "current": current,
        "head": database.SCHEMA_REVISION,
        "up_to_date": current == database.SCHEMA_REVISION,
    }
    _emit(as_json, data, f"current {current or 'none'}, head {database.SCHEMA_REVISION}")


# ---- models ------------------------------------------------------------------------------
@main.group()
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
    """Register model alias NAME for checkpoint SOURCE (e.g. hf://org/model)."""
    revision = settings.pop("revision")
    if resolution is not None:
        settings.update(height=resolution.height, width=resolution.width)
    model = _registry(ctx).add_model(name, source, revision, arch, settings, update=update)
    _emit(as_json, model.to_json(), model.describe())


@models.command("list")
@json_option
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List model aliases."""
    models = _registry(ctx).models()
    _emit(
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
    model = _registry(ctx).model(name).to_json()
    _emit(as_json, model, "\n".join(f"{k}: {v}" for k, v in model.items()))


# ---- plans -------------------------------------------------------------------------------
@main.command()
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
    result = _registry(ctx).publish(file, model_name, resolution, steps)
    _log(f"stored {result.version.object_key} ({result.version.size} bytes)")
    state = "published" if result.created else "already published"
    if result.version.status != READY:
        state += f" ({status_mark(result.version.status)}: it is not served)"
    human = f"{state}: {model_name} {result.target.describe()} v{result.version.version} {result.version.sha256}"
    _emit(as_json, result.to_json(), human)


@main.command()
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
    from .client import fetch_plan

    query = Query(model=model, resolution=resolution, **fields)
    result = fetch_plan(query, _config(ctx), refresh=refresh, use_index=use_index, dest=dest)
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
    _log(
        f"{result.match} match: {model} {matched}{asked}, {result.target['steps']} steps, "
        f"v{result.version} ({result.selected_by}), {how}"
    )
    _emit(as_json, result.to_json(), str(result.path))


@main.command("list")
@click.option("--model", "model_name", help="Only this model's plans.")
@json_option
@click.pass_context
def list_(ctx: click.Context, model_name: str | None, as_json: bool) -> None:
    """List plan versions."""
    rows = _registry(ctx).versions(model_name)
    lines = [
        (
            f"{','.join(r['models']):<16} {r['resolution']:>10} {r['target']['steps']:>4} steps  "
            f"{r['target']['scheduler'] or '-':<32} v{r['version']:<3} {r['sha256'][:12]}  "
            + ",".join([*(["latest"] if r["latest"] else []), *r["aliases"], *_marks(r["status"])])
            + _measured(r["metrics"])
        ).rstrip()
        for r in rows
    ]
    _emit(as_json, rows, "\n".join(lines) or "no plans")


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


@main.command()
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

    registry = _registry(ctx)
    data = registry.show(plan, model_name)
    if presign:
        data["url"] = registry.store.presign(data["object_key"], expires)
    _emit(as_json, data, render({**data, "status": status_mark(data["status"])}))


@main.command()
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
    result = _registry(ctx).promote(plan, alias, expect, model_name)
    previous = result["previous_version"]
    moved = f"from v{previous} " if previous else ""
    _emit(
        as_json,
        result,
        f"{alias} moved {moved}to v{result['version']} (lock version {result['lock_version']})",
    )


@main.command()
@click.argument("plan")
@model_option
@json_option
@click.pass_context
def revoke(ctx: click.Context, plan: str, model_name: str | None, as_json: bool) -> None:
    """Take plan PLAN out of service for good: never served by fetch, the index or latest."""
    result = _registry(ctx).revoke(plan, model_name)
    state = "revoked" if result["changed"] else "already revoked"
    on = (
        f"; aliases still on it (not served): {', '.join(result['aliases'])}"
        if result["aliases"]
        else ""
    )
    _emit(as_json, result, f"{state}: v{result['version']} {result['sha256']}{on}")


@main.command()
@json_option
@click.pass_context
def verify(ctx: click.Context, as_json: bool) -> None:
    """Re-hash every stored plan object and check every model's index against the database.

    Exit 4 when an object is missing or corrupt, or an index is missing or stale
    (`index rebuild` repairs indexes).
    """
    result = _registry(ctx).verify()
    lines = [f"{f['problem']}: {f['object_key']}" for f in result["failures"]]
    _emit(as_json, result, "\n".join([*lines, f"{result['ok']}/{result['checked']} objects ok"]))
    if result["failures"]:
        from .errors import IntegrityFailure

        raise IntegrityFailure(
            f"{len(result['failures'])} stored plans or indexes failed verification "
            f"({result['checked']} plans, {result['indexes_checked']} indexes checked)"
        )


@main.group("index")
def index_group() -> None:
    """The per-model index objects that store-only clients resolve through."""


@index_group.command("rebuild")
@json_option
@click.pass_context
def index_rebuild(ctx: click.Context, as_json: bool) -> None:
    """Rewrite every index that is missing or does not match the database."""
    result = _registry(ctx).check_indexes(rebuild=True)
    human = f"rewrote {len(result['rewritten'])} of {result['checked']} indexes"
    _emit(as_json, result, "\n".join([*(f"rewrote {k}" for k in result["rewritten"]), human]))


@main.command()
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
    result = _registry(ctx).gc(
        timedelta(seconds=min_age), dry_run, failed_job_age=timedelta(seconds=failed_job_age)
    )
    verb = "would delete" if dry_run else "deleted"
    counts = (
        f"{len(result['deleted'])} objects, {len(result['temporaries'])} temporary files, "
        f"{len(result['job_objects'])} statistics of {len(result['failed_jobs'])} failed jobs"
    )
    _emit(as_json, result, f"{verb} {counts} ({result['freed_bytes']} bytes)")
