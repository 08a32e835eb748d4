"""The fleet's commands of ``invardiff-registry``: ``calibrate`` and ``jobs`` (see docs/fleet.md).

Only click and light modules at module level, so ``invardiff-registry --help`` and ``fetch``
never import Ray or torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from registry.errors import InvalidInput
from registry.matching import Resolution
from workers.errors import QualityGateFailed

from .base import (
    FINITE,
    RESOLUTION,
    STEPS,
    command,
    emit,
    error_object,
    group,
    json_option,
    log,
    open_registry,
)

QUANTILE_KINDS = ("attn", "mlp", "ff", "context_attn", "context_ff", "single_attn", "single_mlp")
LEASE_ENV = "INVARDIFF_JOB_LEASE_S"


def _quantile_options(command):
    for kind in reversed(QUANTILE_KINDS):
        flag = "--q-" + kind.replace("_", "-")
        command = click.option(
            flag, f"q_{kind}", type=FINITE, help=f"Quantile of the {kind} flags."
        )(command)
    return command


def _parse_settings(values: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` engine parameters (VALUE as JSON when it parses, else a string)."""
    import json

    settings = {}
    for item in values:
        key, found, value = item.partition("=")
        if not found or not key:
            raise InvalidInput(f"--set {item!r}: expected KEY=VALUE")
        try:
            settings[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.replace("-", "_")] = value
    return settings


def _lease_seconds() -> float:
    from registry.jobs import DEFAULT_LEASE_SECONDS

    text = os.environ.get(LEASE_ENV)
    try:
        value = float(text) if text else DEFAULT_LEASE_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidInput(f"{LEASE_ENV}={text!r}: expected a number of seconds > 0")
    return value


def _json_errors(callback: Callable[..., None]) -> Callable[..., None]:
    """With ``--json``, a failure also prints ``{"error", "exit_code"}`` on stdout (a failed
    quality gate has printed its result already), so that the output always parses."""

    @functools.wraps(callback)
    def run(ctx: click.Context, *args: Any, **kwargs: Any) -> None:
        try:
            callback(ctx, *args, **kwargs)
        except QualityGateFailed:
            raise
        except Exception as exc:
            if kwargs.get("as_json"):
                emit(True, error_object(exc))
            raise

    return run


@command()
@click.argument("model")
@click.argument("resolution", type=RESOLUTION)
@click.option("--steps", type=STEPS, help="Step count (default: the model's).")
@click.option("--guidance", type=FINITE, help="Guidance scale (default: the model's).")
@click.option("--preset", type=click.Choice(["fast", "slow"]), help="Calibration preset [fast].")
@click.option("--q-step", type=FINITE, help="Quantile of the step gate.")
@_quantile_options
@click.option("--nonskip", type=FINITE, help="Warm-up fraction of steps never reused.")
@click.option("--flag-index", type=click.Choice(["reference", "aligned"]), help="Flag alignment.")
@click.option("--max-consecutive", type=click.IntRange(min=1), help="Cap on consecutive reuse.")
@click.option(
    "--target-speedup", type=FINITE, metavar="X",
    help="Budget: the most faithful plan with this ideal speed-up.",
)  # fmt: skip
@click.option(
    "--target-psnr", type=FINITE, metavar="DB",
    help="Budget: the fastest plan whose certified mean PSNR on fresh seeds is at least DB.",
)  # fmt: skip
@click.option(
    "--target-psnr-p5", type=FINITE, metavar="DB",
    help="Budget: the same on a 90%-confidence lower bound of the 5th-percentile PSNR "
    "(at least 45 fresh samples; alone or with --target-psnr).",
)  # fmt: skip
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other engine calibration parameter.",
)
@click.option("--trajectories", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration calls (condition x seed).")  # fmt: skip
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Prompt file, one a line (text-to-image models; default: a built-in set).")  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), help="Actors (default: one per GPU, else per CPU)."
)
@click.option("--worker-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="CPUs per actor on a cluster without GPUs.")  # fmt: skip
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="Existing Ray cluster [env RAY_ADDRESS]; default: a local Ray.",
)
@click.option("--validate", type=click.IntRange(min=0), default=8, show_default=True,
              help="Held-out validation samples (0: skip validation).")  # fmt: skip
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved timing repeats of the validation.")  # fmt: skip
@click.option(
    "--min-psnr", type=FINITE, metavar="DB", help="Quality gate: minimum PSNR vs full compute."
)
@click.option(
    "--min-speedup", type=FINITE, metavar="X", help="Quality gate: minimum measured speed-up."
)
@click.option(
    "--promote",
    "promote_alias",
    metavar="ALIAS",
    help="Move ALIAS to the plan if it passes the gate.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the report PNGs and JSON into DIR.",
)
@click.option(
    "--no-wait", is_flag=True, help="Exit 10 instead of waiting on a job another driver runs."
)
@json_option
@click.pass_context
@_json_errors
def calibrate(
    ctx: click.Context,
    model: str,
    resolution: Resolution,
    steps: int | None,
    guidance: float | None,
    preset: str | None,
    settings: tuple[str, ...],
    trajectories: int,
    prompts_file: Path | None,
    workers: int | None,
    worker_cpus: float,
    ray_address: str | None,
    validate: int,
    repeats: int,
    min_psnr: float | None,
    min_speedup: float | None,
    promote_alias: str | None,
    report: Path | None,
    no_wait: bool,
    as_json: bool,
    **params: Any,
) -> None:
    """Calibrate MODEL at RESOLUTION on Ray, validate, publish and record the job.

    The same request again returns the existing version (created: false). Exit codes beyond
    the registry's: 8 quality gate failed (published, not promoted), 9 job failed, 10 job
    running elsewhere (--no-wait).
    """
    from workers.driver import RunOptions, submit
    from workers.options import check_options
    from workers.request import build_request

    if promote_alias is not None:
        from registry.matching import check_name

        check_name(promote_alias, "alias")
    options = RunOptions(
        workers=workers, ray_address=ray_address, cpus_per_worker=worker_cpus,
        lease_seconds=_lease_seconds(), wait=not no_wait, min_psnr=min_psnr,
        min_speedup=min_speedup, promote=promote_alias, report=report, progress=log,
    )  # fmt: skip
    check_options(options)  # before the registry is opened (or created): nothing written
    budget = {"target_speedup": params.pop("target_speedup"), "min_psnr": params.pop("target_psnr"),
              "min_psnr_p5": params.pop("target_psnr_p5")}  # fmt: skip
    overrides = {k: v for k, v in params.items() if v is not None}
    overrides.update(_parse_settings(settings))
    registry = _embedded_or_configured(ctx)
    request = build_request(
        registry.model(model), resolution, steps=steps, guidance=guidance, preset=preset,
        params=overrides, trajectories=trajectories, prompts_file=prompts_file,
        validate=validate, repeats=repeats, budget=budget,
    )  # fmt: skip
    result = submit(registry, request, options).to_json()
    emit(as_json, result, _describe(result))
    if not result["gate"]["passed"]:
        raise QualityGateFailed(
            f"quality gate failed: {'; '.join(result['gate']['reasons'])} (published, not promoted)"
        )


def _embedded_or_configured(ctx: click.Context):
    """The configured registry; the embedded default (nothing configured) is created on first use.

    So that ``calibrate`` on a fresh machine needs no ``init`` first. A configured database is
    never initialized implicitly, and an existing schema is never upgraded implicitly.
    """
    configured = any(ctx.obj.get(k) for k in ("database_url", "store_url")) or any(
        os.environ.get(k) for k in ("INVARDIFF_DATABASE_URL", "INVARDIFF_STORE_URL")
    )
    if not configured:
        from registry import db

        registry = open_registry(ctx, create=True, check_schema=False)
        if db.current_revision(registry.engine) is None:
            log(f"creating the embedded registry ({db.display_url(str(registry.engine.url))})")
            registry.init()
    return open_registry(ctx)


def _describe(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    state = "calibrated" if result["created"] else "already calibrated"
    lines = [
        (
            f"{state}: {result['model']} v{result['version']} {result['sha256']} "
            f"(job {result['job_key'][:12]})"
        ),
        f"ideal speed-up {metrics.get('ideal_speedup', 0):.2f}x",
    ]
    if "measured_speedup" in metrics:
        psnr = metrics["psnr_db"]
        lines[1] = (
            f"speed-up {metrics['measured_speedup']:.2f}x measured ({metrics['ideal_speedup']:.2f}x "
            f"ideal); PSNR {'inf' if psnr is None else psnr} dB, SSIM {metrics.get('ssim', '-')} "
            f"vs full compute on {metrics['validation']['samples']} held-out samples"
        )
    if result["promoted"]:
        lines.append(f"promoted to {result['promoted']}")
    for name, path in (result.get("report") or {}).items():
        lines.append(f"report {name}: {path}")
    return "\n".join(lines)


@group()
def jobs() -> None:
    """Calibration jobs: status, attempts, shard progress, timings, result."""


@jobs.command("list")
@click.option(
    "--status",
    type=click.Choice(["pending", "running", "succeeded", "failed", "cancelled"]),
    help="Only the jobs in this state.",
)
@click.option("--model", "model_name", help="Only this model alias's jobs.")
@json_option
@click.pass_context
def jobs_list(
    ctx: click.Context, status: str | None, model_name: str | None, as_json: bool
) -> None:
    """List calibration jobs, newest first."""
    from registry.jobs import list_jobs

    rows = [
        j.to_json(with_request=False) for j in list_jobs(open_registry(ctx), status, model_name)
    ]
    lines = [
        f"{r['job_key'][:12]}  {r['status']:<9} {r['model']:<16} attempts {r['attempts']}  "
        f"v{(r['result'] or {}).get('version', '-')}  {r['created_at']}{_progress_text(r)}"
        for r in rows
    ]
    emit(as_json, rows, "\n".join(lines) or "no jobs")


def _progress_text(job: dict[str, Any]) -> str:
    """``  phase-2 3/8, ETA 12 s at <time>`` for a running job's latest phase; else empty."""
    if job["status"] != "running":
        return ""
    phases = [(k, v) for k, v in (job.get("progress") or {}).items() if isinstance(v, dict)]
    if not phases:
        return "  starting"
    name, state = phases[-1]
    text = f"  {name} {state.get('done', 0)}/{state.get('total', '?')}"
    if state.get("eta_s") is not None:
        text += f", ETA {state['eta_s']:.0f} s"
    return text + (f" at {state['updated_at']}" if state.get("updated_at") else "")


@jobs.command("show")
@click.argument("job")
@json_option
@click.pass_context
def jobs_show(ctx: click.Context, job: str, as_json: bool) -> None:
    """Show job JOB (its key or a prefix of at least 6 hex digits), with its history:
    attempts, lost workers and nodes, damaged shards and errors, with their times."""
    import json

    from registry.jobs import get_job, history

    registry = open_registry(ctx)
    data = get_job(registry, job).to_json()
    data["history"] = history(registry, data["job_key"])
    lines = [f"{k}: {json.dumps(v, default=str)}" for k, v in data.items() if k != "history"]
    lines.append("history:")
    lines += [
        f"  {e['at']}  attempt {e['attempt']}  {e['event']}"
        + (f": {e['detail']}" if e.get("detail") else "")
        for e in data["history"]
    ]
    emit(as_json, data, "\n".join(lines))


@jobs.command("reset")
@click.argument("job")
@click.option("--drop-shards", is_flag=True, help="Also delete the job's stored statistics.")
@json_option
@click.pass_context
def jobs_reset(ctx: click.Context, job: str, drop_shards: bool, as_json: bool) -> None:
    """Put job JOB back to pending: the next calibrate of its request computes it again
    (from its stored shards, which are checked, unless --drop-shards). Refused while a
    driver holds the job's live lease (exit 7)."""
    from registry.jobs import reset

    registry = open_registry(ctx)
    info = reset(registry, job)
    dropped = 0
    if drop_shards:
        for item in list(registry.store.list(f"jobs/{info.job_key}/phase-")):
            registry.store.delete(item.key)
            dropped += 1
    data = {"job_key": info.job_key, "status": info.status, "shards_deleted": dropped}
    emit(as_json, data, f"job {info.job_key[:12]} reset to pending ({dropped} shard(s) deleted)")
