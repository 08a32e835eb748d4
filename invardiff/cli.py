"""What the ``invardiff`` command does, as functions: calibrate a built-in model in-process
and compare cached against full compute. The command line itself is
:mod:`invardiff_cli.engine_commands`:

    invardiff demo [--model digits-flux] [--preset fast | --target-speedup X | --target-psnr Y [--target-psnr-p5 Z]] [--out out/]
    invardiff calibrate --model digits-dit --out plan.json [--trajectories 8] [--target-speedup X] [--json]
    invardiff show PLAN [--json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .builtins import BUILTIN_MODELS


def builtin_settings(model: str) -> tuple[int, float]:
    """Steps and guidance of a built-in model's documented protocol."""
    settings = BUILTIN_MODELS[model]
    return int(settings["num_inference_steps"]), float(settings["guidance_scale"])


def calibration_calls(
    model: str, trajectories: int, guidance: float | None = None, steps: int | None = None
) -> list[dict]:
    """Deterministic calls for a built-in model: one digit class and one seed each (guidance
    and step count: the model's unless given)."""
    default_steps, default_guidance = builtin_settings(model)
    guidance = default_guidance if guidance is None else guidance
    steps = steps or default_steps
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


def calibrate_builtin(
    model: str, trajectories: int, guidance: float | None, rules: dict, pipe=None, steps: int | None = None
):
    """Calibrate a built-in model with ``rules`` (``mode``, ``preset``, ``target_speedup``,
    ``min_psnr``, ``min_psnr_p5``); progress goes to stderr."""
    from . import calibrate
    from .models import load_builtin

    pipe = pipe or load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    return calibrate(pipe, calibration_calls(model, trajectories, guidance, steps), model_id=model,
                     progress=lambda m: print(f"  {m}", file=sys.stderr), **rules)  # fmt: skip


def run_demo(
    model: str, rules: dict, trajectories: int, guidance: float | None, batch: int, repeats: int, out: Path,
    steps: int | None = None,
) -> dict:
    """Calibrate ``model`` in-process with ``rules``, then time and compare full vs cached generation."""
    from . import metrics
    from .models import load_builtin
    from .timing import time_full_vs_cached

    pipe = load_builtin(model)
    default_steps, default_guidance = builtin_settings(model)
    guidance = default_guidance if guidance is None else guidance
    steps = steps or default_steps
    started = time.perf_counter()
    plan = calibrate_builtin(model, trajectories, guidance, rules, pipe, steps)
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


def main(argv: list[str] | None = None) -> int:
    """Run the ``invardiff`` command on ``argv``; its exit code.

    A shim kept for ``python -m invardiff.cli`` and callers of ``invardiff.cli.main``: the
    command line is assembled in the top-level ``invardiff_cli`` package, so this is an upward
    import, allowed for this shim alone (tests/test_layout.py).
    """
    from invardiff_cli.engine_commands import invardiff_main

    return invardiff_main(argv)


if __name__ == "__main__":
    sys.exit(main())
