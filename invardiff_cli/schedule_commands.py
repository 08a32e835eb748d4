"""The schedule's command of ``invardiff-registry``: ``recalibrate`` submits the calibrations
that are due (docs/fleet-ops.md). Only click and light modules at module level.
"""

from __future__ import annotations

import click

from registry.validation import MAX_MIN_AGE

from .base import FINITE, command, emit, json_option, log, open_registry

MAX_AGE_DAYS = MAX_MIN_AGE.days


def _check_max_age(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 <= value <= MAX_AGE_DAYS:
        raise click.BadParameter(f"{value:g} is not within 0..{MAX_AGE_DAYS} days", ctx, param)
    return value


@command()
@click.option("--due", is_flag=True, help="Find the stale plans and submit their calibrations.")
@click.option(
    "--max-age",
    type=FINITE,
    callback=_check_max_age,
    metavar="DAYS",
    help="Also recalibrate targets last calibrated longer ago than this.",
)
@click.option("--dry-run", is_flag=True, help="Only report what is due; write nothing.")
@click.option("--job", "job_ref", metavar="JOB", help="Run one stored job (what submissions run).")
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="http://HEAD:8265: submit to that cluster's job server; auto, ray://...: run the "
    "jobs here on that cluster; default: a local Ray [env RAY_ADDRESS].",
)
@click.option("--workers", type=click.IntRange(min=1), help="Actors per job when run here.")
@click.option(
    "--promote",
    "promote_alias",
    metavar="ALIAS",
    help="Move ALIAS to each new plan that passes the gate (needs --min-psnr or --min-speedup).",
)
@click.option("--min-psnr", type=FINITE, metavar="DB", help="Quality gate: minimum PSNR.")
@click.option("--min-speedup", type=FINITE, metavar="X", help="Quality gate: minimum speed-up.")
@json_option
@click.pass_context
def recalibrate(
    ctx: click.Context,
    due: bool,
    max_age: float | None,
    dry_run: bool,
    job_ref: str | None,
    ray_address: str | None,
    workers: int | None,
    promote_alias: str | None,
    min_psnr: float | None,
    min_speedup: float | None,
    as_json: bool,
) -> None:
    """Recalibrate the targets whose latest plan is stale (--due), or run one job (--job).

    Stale: the model alias points at another revision, the calibrator or the diffusers/torch
    minor version changed, the plan is older than --max-age, it was marked (mark-stale), or
    every plan of its target was revoked. Each job is inserted once (unique job key) and
    submitted once, even when several schedulers run at the same time; a Ray submission that
    failed or vanished before its job started fails the job and is submitted again (exit 1).
    """
    if due == (job_ref is not None):
        raise click.UsageError("give exactly one of --due and --job JOB")
    if job_ref is not None and (dry_run or max_age is not None):
        raise click.UsageError("--dry-run and --max-age go with --due")
    gate = {"min_psnr": min_psnr, "min_speedup": min_speedup}
    if promote_alias is not None:
        from registry.matching import check_name

        check_name(promote_alias, "alias")
        if min_psnr is None and min_speedup is None:
            raise click.UsageError(
                "--promote moves an alias only through the quality gate: "
                "give --min-psnr and/or --min-speedup"
            )
    from workers.schedule import InProcess, current_policy, dispatcher_for, recalibrate_due, run_job

    registry = open_registry(ctx)
    settings = {"workers": workers, "promote": promote_alias, "progress": log, "gate": gate}
    if job_ref is not None:
        result = run_job(registry, job_ref, InProcess(ray_address=ray_address, **settings))
        emit(as_json, result, f"job {result['job_key'][:12]}: {result['action']}")
        if result["action"] == "failed":
            from workers.errors import JobFailed

            raise JobFailed(result["error"])
        _gate_exit([result])
        return
    dispatcher = dispatcher_for(ray_address, **settings)  # a dry run asks, never submits
    result = recalibrate_due(registry, current_policy(max_age), dispatcher, log, dry_run)
    lines = [
        f"{e['action']:<17} {e['model']:<16} {e['resolution']:>10} {e['target']['steps']:>4} steps  "
        f"{','.join(e['reasons'])}  {(e.get('job_key') or '-')[:12]}"
        for e in result["due"]
    ]
    emit(as_json, result, "\n".join(lines) or "nothing is due")
    failed = [e for e in result["due"] if e["action"] in ("error", "failed")]
    resubmitted = [e for e in result["due"] if e["action"] in ("resubmitted", "would_resubmit")]
    problems = []
    if failed:
        problems.append(f"{len(failed)} due plan(s) could not be submitted or failed")
    if resubmitted:
        again = "would be submitted again" if dry_run else "submitted again"
        problems.append(
            f"{len(resubmitted)} Ray submission(s) failed before their job started ({again})"
        )
    if problems:
        from registry.errors import RegistryError

        raise RegistryError("; ".join(problems) + " (see 'error' in the report)")
    _gate_exit(result["due"])


def _gate_exit(entries: list[dict]) -> None:
    """Exit 8 when a plan calibrated here is below the gate (recorded, not served or promoted)."""
    below = [e for e in entries if e["action"] == "gate_failed"]
    if below:
        from workers.errors import QualityGateFailed

        reasons = "; ".join(r for e in below for r in e["gate"]["reasons"])
        raise QualityGateFailed(
            f"{len(below)} recalibrated plan(s) below the quality gate ({reasons}): "
            "recorded as FAILED-GATE, not served, not promoted"
        )
