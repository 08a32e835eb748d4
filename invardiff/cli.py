"""``invardiff``: calibrate a built-in model and compare cached against full compute.

    invardiff demo [--model digits-flux] [--preset fast | --target-speedup X | --min-psnr Y [--min-psnr-p5 Z]] [--out out/]
    invardiff calibrate --model digits-dit --out plan.json [--trajectories 8] [--target-speedup X]
    invardiff show PLAN [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .display import render
from .official import load_plan
from .plan import PlanError

BUILTIN = ("digits-dit", "digits-flux", "digits-flux-shifted")
DESCRIPTION = (
    "Calibrate a built-in model and compare cached against full compute, or inspect a plan. "
    "The registry and the calibration fleet are invardiff-registry."
)


def builtin_settings(model: str) -> tuple[int, float]:
    """Steps and guidance of a built-in model's documented protocol."""
    from .models import BUILTIN_MODELS

    settings = BUILTIN_MODELS[model]
    return int(settings["num_inference_steps"]), float(settings["guidance_scale"])


def calibration_calls(model: str, trajectories: int, guidance: float | None = None) -> list[dict]:
    """Deterministic calls for a built-in model: one digit class and one seed each."""
    steps, default_guidance = builtin_settings(model)
    guidance = default_guidance if guidance is None else guidance
    return [
        {"class_labels": [i % 10], "num_inference_steps": steps, "guidance_scale": guidance, "seed": 1000 + i}
        for i in range(trajectories)
    ]


def _generate(pipe, labels, steps, guidance, seed):
    import torch

    return pipe(
        class_labels=labels,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def _grid(rows: list[np.ndarray], scale: int = 4) -> Image.Image:  # noqa: F821
    from PIL import Image

    tiles = [np.concatenate(list(row), axis=1) for row in rows]
    grid = np.concatenate(tiles, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    image = Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def calibrate_builtin(model: str, trajectories: int, guidance: float | None, rules: dict, pipe=None):
    """Calibrate a built-in model with ``rules`` (``mode``, ``preset``, ``target_speedup``,
    ``min_psnr``, ``min_psnr_p5``); progress goes to stderr."""
    from . import calibrate
    from .models import load_builtin

    pipe = pipe or load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    return calibrate(pipe, calibration_calls(model, trajectories, guidance), model_id=model,
                     progress=lambda m: print(f"  {m}", file=sys.stderr), **rules)  # fmt: skip


def run_demo(
    model: str, rules: dict, trajectories: int, guidance: float | None, batch: int, repeats: int, out: Path
) -> dict:
    """Calibrate ``model`` in-process with ``rules``, then time and compare full vs cached generation."""
    from . import metrics
    from .models import load_builtin
    from .timing import time_full_vs_cached

    pipe = load_builtin(model)
    steps, default_guidance = builtin_settings(model)
    guidance = default_guidance if guidance is None else guidance
    started = time.perf_counter()
    plan = calibrate_builtin(model, trajectories, guidance, rules, pipe)
    calibration_s = time.perf_counter() - started
    preset = rules_label(rules)
    labels = [i % 10 for i in range(batch)]
    timed = time_full_vs_cached(pipe, plan, lambda r: _generate(pipe, labels, steps, guidance, seed=r), repeats)
    full, fast = timed.full, timed.cached
    out.mkdir(parents=True, exist_ok=True)
    plan_path = plan.save(out / f"{model}-{preset}.plan.json")
    png = out / f"{model}-{preset}-full-vs-cached.png"
    _grid([full[:10], fast[:10]]).save(png)
    summary = plan.summary()
    return {
        "model": model,
        "mode": rules["mode"],
        "rules": preset,
        "candidate": plan.calibration.get("candidate"),
        **{f"certified_{k}": v for k, v in (plan.calibration.get("certified") or {}).items()},
        "guidance": guidance,
        "plan": str(plan_path),
        "sha256": plan.sha256,
        "png": str(png),
        "calibration_s": round(calibration_s, 2),
        "full_s": round(timed.full_s, 4),
        "cached_s": round(timed.cached_s, 4),
        "speedup": round(timed.speedup, 3),
        "ideal_speedup": summary.ideal_speedup,
        "reused_steps": summary.reused_steps,
        "psnr_db": round(float(metrics.psnr(fast, full)), 2),
        "ssim": round(float(metrics.ssim(fast, full)), 4),
        "labels_agree": float(np.mean(metrics.classify(fast) == metrics.classify(full))),
    }


def rules_label(rules: dict) -> str:
    """Short name of calibration rules for file names: ``fast``, ``x2.8``, ``40dB``, ``p5-35dB``."""
    if rules.get("target_speedup") is not None:
        return f"x{rules['target_speedup']:g}"
    floors = [f"{prefix}{rules[key]:g}dB" for key, prefix in (("min_psnr", ""), ("min_psnr_p5", "p5-"))
              if rules.get(key) is not None]  # fmt: skip
    return "-".join(floors) or rules.get("preset") or "fast"


def _rules(args, parser: argparse.ArgumentParser) -> dict:
    """Validated calibration rules from the command line (usage error otherwise)."""
    from .calibration import calibration_mode

    steps, _ = builtin_settings(args.model)
    try:
        mode = calibration_mode(args.mode, args.target_speedup, args.min_psnr, args.preset, {}, args.min_psnr_p5)
    except ValueError as exc:
        parser.error(str(exc).replace("target_speedup", "--target-speedup").replace("min_psnr", "--min-psnr")
                     .replace("_p5", "-p5"))  # fmt: skip
    if args.target_speedup is not None and args.target_speedup > steps / 2:
        parser.error(f"--target-speedup {args.target_speedup:g} is unreachable for {args.model}: at most "
                     f"{steps / 2:g}x ({steps} steps, first and last always computed)")  # fmt: skip
    if mode == "reference":
        return {"mode": mode, "preset": args.preset or "fast"}
    return {"mode": mode, "target_speedup": args.target_speedup, "min_psnr": args.min_psnr,
            "min_psnr_p5": args.min_psnr_p5}  # fmt: skip


def _add_rules(command: argparse.ArgumentParser) -> None:
    command.add_argument("--mode", choices=["budget", "reference"],
                         help="budget (default with a target) or reference (the paper's rules; default without)")
    command.add_argument("--preset", choices=["fast", "slow"], help="reference rules' preset (default fast)")
    command.add_argument("--target-speedup", type=float, metavar="X",
                         help="budget: the most faithful plan with ideal speed-up >= X")
    command.add_argument("--min-psnr", type=float, metavar="DB",
                         help="budget: the fastest plan whose certified mean PSNR on fresh seeds is >= DB")
    command.add_argument("--min-psnr-p5", type=float, metavar="DB",
                         help="budget: the same on the certified 5th-percentile PSNR (alone or with --min-psnr)")  # fmt: skip


def _print(result: dict, as_json: bool) -> None:
    print(json.dumps(result, indent=2) if as_json else render(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="invardiff", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="calibrate a built-in model, compare cached vs full (speed-up, PSNR, PNG)",
                          description="Calibrate a built-in model in-process (no registry, no Ray), then time "
                          "full against cached generation, interleaved, and compare them.")  # fmt: skip
    demo.add_argument("--model", default="digits-flux", choices=BUILTIN, help="built-in model (default digits-flux)")
    _add_rules(demo)
    demo.add_argument("--trajectories", type=int, default=8, metavar="N",
                      help="calibration calls, one digit class and seed each (default 8)")  # fmt: skip
    demo.add_argument("--guidance", type=float, help="default: the model's documented guidance")
    demo.add_argument("--batch", type=int, default=32, metavar="N",
                      help="images per timed generation (default 32)")  # fmt: skip
    demo.add_argument("--repeats", type=int, default=3, metavar="N",
                      help="interleaved timing repeats; the medians are reported (default 3)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                      help="folder for the plan and the full-vs-cached PNG (default out/)")  # fmt: skip
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    cal = sub.add_parser("calibrate", help="calibrate a built-in model and write the plan",
                         description="Calibrate a built-in model in-process and write the plan file.")  # fmt: skip
    cal.add_argument("--model", default="digits-flux", choices=BUILTIN, help="built-in model (default digits-flux)")
    _add_rules(cal)
    cal.add_argument("--trajectories", type=int, default=8, metavar="N",
                     help="calibration calls, one digit class and seed each (default 8)")  # fmt: skip
    cal.add_argument("--guidance", type=float, help="default: the model's documented guidance")
    cal.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the plan (JSON)")
    show = sub.add_parser("show", help="print a plan's target and summary",
                          description="Print a plan's target and summary: a native plan or a reference "
                          "cache book.")  # fmt: skip
    show.add_argument("plan", type=Path, help="plan file (native JSON or a reference cache book)")
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.trajectories < 1 or args.batch < 1 or args.repeats < 1:
                parser.error("--trajectories, --batch and --repeats must be positive")
            rules = _rules(args, parser)
            _print(run_demo(args.model, rules, args.trajectories, args.guidance, args.batch, args.repeats,
                            args.out), args.json)  # fmt: skip
        elif args.command == "calibrate":
            if args.trajectories < 1:
                parser.error("--trajectories must be positive")
            rules = _rules(args, parser)
            print(calibrate_builtin(args.model, args.trajectories, args.guidance, rules).save(args.out))
        else:
            plan = load_plan(args.plan)
            result = {"sha256": plan.sha256, "arch": plan.arch, "steps": plan.steps,
                      "layers": plan.layer_counts(), "target": plan.target.to_json(),
                      "summary": plan.summary().to_json()}  # fmt: skip
            _print(result, args.json)
    except PlanError as exc:
        print(f"invardiff: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
