"""The ``invardiff`` command: ``demo``, ``calibrate`` and ``show`` on the engine alone (no
registry, no Ray). The work itself is :mod:`invardiff.cli`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from invardiff.builtins import BUILTIN_MODELS
from invardiff.cli import builtin_settings, calibrate_builtin, run_demo
from invardiff.plan import PlanError
from registry.errors import GENERIC, USAGE
from workers.request import MIN_STEPS

from .base import FINITE, POSITIVE, STEPS, Main, emit, json_option, log

DEPRECATED = {"min_psnr": ("--min-psnr", "--target-psnr"),
              "min_psnr_p5": ("--min-psnr-p5", "--target-psnr-p5")}  # fmt: skip


class EngineMain(Main):
    """``invardiff``'s failures: a bad plan file exits 1, an input the engine refuses exits 2."""

    def explain(self, exc: Exception) -> tuple[int, str] | None:
        if isinstance(exc, PlanError):
            return GENERIC, str(exc)
        if isinstance(exc, ValueError):
            return USAGE, str(exc)
        if isinstance(exc, OSError):
            return GENERIC, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        return None


@click.group("invardiff", cls=EngineMain, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Calibrate a built-in model and compare cached against full compute, or inspect a plan.

    The registry and the calibration fleet are invardiff-registry.

    \b
    Exit codes:
      0  ok
      1  error (a plan file that cannot be read or is invalid, a file that cannot be written)
      2  usage or invalid input
    """


def _rule_options(command: Any) -> Any:
    """The calibration rules: reference (preset) or a budget (one target)."""
    options = [
        click.option("--mode", type=click.Choice(["budget", "reference"]),
                     help="budget (default with a target) or reference (the paper's rules; default without)"),
        click.option("--preset", type=click.Choice(["fast", "slow"]),
                     help="reference rules' preset (default fast)"),
        click.option("--target-speedup", type=FINITE, metavar="X",
                     help="budget: the most faithful plan with ideal speed-up >= X"),
        click.option("--target-psnr", type=FINITE, metavar="DB",
                     help="budget: the fastest plan whose certified mean PSNR on fresh seeds is >= DB"),
        click.option("--target-psnr-p5", type=FINITE, metavar="DB",
                     help="budget: the same on a 90%-confidence lower bound of the 5th-percentile PSNR "
                          "(at least 45 fresh samples; alone or with --target-psnr)"),
        click.option("--min-psnr", type=FINITE, metavar="DB", hidden=True,
                     help="deprecated spelling of --target-psnr"),
        click.option("--min-psnr-p5", type=FINITE, metavar="DB", hidden=True,
                     help="deprecated spelling of --target-psnr-p5"),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _targets(given: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """The PSNR targets and the flag each came from; a deprecated spelling warns on stderr."""
    targets, flags = {}, {}
    for key, (old, new) in DEPRECATED.items():
        value, old_value = given[f"target_{key.removeprefix('min_')}"], given[key]
        flags[key] = new
        if old_value is not None:
            if value is not None:
                raise click.UsageError(f"give {new} (or its old spelling {old}), not both")
            log(f"invardiff: warning: {old} is deprecated: it is spelled {new} (the --min-* flags "
                "are quality gates in invardiff-registry)")  # fmt: skip
            value, flags[key] = old_value, old
        targets[key] = value
    return targets, flags


def _rules(model: str, steps: int | None, given: dict[str, Any]) -> dict[str, Any]:
    """Validated calibration rules from the command line (usage error otherwise)."""
    from invardiff.calibration import calibration_mode

    steps = steps or builtin_settings(model)[0]
    if steps < MIN_STEPS:
        raise click.UsageError(f"--steps must be at least {MIN_STEPS} (the change scores compare three steps)")
    targets, flags = _targets(given)
    speedup = given["target_speedup"]
    try:
        mode = calibration_mode(given["mode"], speedup, targets["min_psnr"], given["preset"], {},
                                targets["min_psnr_p5"])  # fmt: skip
    except ValueError as exc:
        message = str(exc).replace("min_psnr_p5", flags["min_psnr_p5"])
        message = message.replace("min_psnr", flags["min_psnr"])
        raise click.UsageError(message.replace("target_speedup", "--target-speedup")) from None
    if speedup is not None and speedup > steps / 2:
        raise click.UsageError(f"--target-speedup {speedup:g} is unreachable for {model}: at most "
                               f"{steps / 2:g}x ({steps} steps, first and last always computed)")  # fmt: skip
    if mode == "reference":
        return {"mode": mode, "preset": given["preset"] or "fast"}
    return {"mode": mode, "target_speedup": speedup, **targets}


model_option = click.option(
    "--model", default="digits-flux", type=click.Choice(sorted(BUILTIN_MODELS)),
    help="built-in model (default digits-flux)",
)  # fmt: skip
trajectories_option = click.option(
    "--trajectories", type=POSITIVE, default=8, metavar="N",
    help="calibration calls, one digit class and seed each (default 8)",
)  # fmt: skip
guidance_option = click.option(
    "--guidance", type=FINITE, metavar="G", help="default: the model's documented guidance"
)
steps_option = click.option(
    "--steps", type=STEPS, metavar="N",
    help="denoising steps (default: the model's documented count; a plan is valid for its own)",
)  # fmt: skip


@main.command()
@model_option
@_rule_options
@trajectories_option
@guidance_option
@steps_option
@click.option("--batch", type=POSITIVE, default=32, metavar="N",
              help="images per timed generation (default 32)")  # fmt: skip
@click.option("--repeats", type=POSITIVE, default=3, metavar="N",
              help="interleaved timing repeats; the medians are reported (default 3)")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("out"),
              metavar="DIR", help="folder for the plan and the full-vs-cached PNG (default out/)")  # fmt: skip
@json_option
def demo(model: str, trajectories: int, guidance: float | None, steps: int | None, batch: int,
         repeats: int, out: Path, as_json: bool, **given: Any) -> None:  # fmt: skip
    """Calibrate a built-in model in-process (no registry, no Ray), then time full against
    cached generation, interleaved, and compare them: speed-up, PSNR, a PNG."""
    from invardiff.display import render

    result = run_demo(model, _rules(model, steps, given), trajectories, guidance, batch, repeats, out, steps)
    emit(as_json, result, render(result))


def _in_a_folder(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """Refuse an output file whose folder does not exist, before any work."""
    if not value.parent.is_dir():
        raise click.BadParameter(f"folder {str(value.parent)!r} does not exist", ctx, param)
    return value


@main.command()
@model_option
@_rule_options
@trajectories_option
@guidance_option
@steps_option
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              callback=_in_a_folder, metavar="FILE", help="where to write the plan (JSON)")  # fmt: skip
@json_option
def calibrate(model: str, trajectories: int, guidance: float | None, steps: int | None, out: Path,
              as_json: bool, **given: Any) -> None:  # fmt: skip
    """Calibrate a built-in model in-process and write the plan file (its path on stdout)."""
    plan = calibrate_builtin(model, trajectories, guidance, _rules(model, steps, given), steps=steps)
    path = plan.save(out)
    data = {"plan": str(path), "sha256": plan.sha256, "model": model,
            "mode": plan.calibration.get("mode"), "summary": plan.summary().to_json()}  # fmt: skip
    emit(as_json, data, str(path))


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@json_option
def show(plan: Path, as_json: bool) -> None:
    """Print a plan's target and summary: a native plan or a reference cache book (PLAN)."""
    from invardiff.display import render
    from invardiff.official import load_plan

    loaded = load_plan(plan)
    result = {"sha256": loaded.sha256, "arch": loaded.arch, "steps": loaded.steps,
              "layers": loaded.layer_counts(), "target": loaded.target.to_json(),
              "summary": loaded.summary().to_json()}  # fmt: skip
    emit(as_json, result, render(result))


def invardiff_main(argv: list[str] | None = None) -> int:
    """Run ``invardiff`` on ``argv``; the exit code of the command (usage errors and
    ``--help`` exit at once, as argparse does)."""
    return main.outcome(argv, "invardiff")
