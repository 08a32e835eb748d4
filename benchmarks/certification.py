"""Does a certified fidelity target hold on samples nobody used? And what does the search cost?

Protocol (docs/certification.md): calibrate a built-in model with the ``invardiff`` command's
calls (``--trajectories`` calls, label i % 10, seed 1000 + i, the model's guidance) for
``min_psnr=Y`` per ``--targets`` and for ``target_speedup`` per ``--speedups``, with the default
selection and certification sets (the calibration calls with fresh seeds each). Then measure
the plan on ``--fresh`` samples (labels 0-9, seeds from 700000: no set of the search used
them) and report the certified and fresh mean and 5th percentile, and the plans and sampling
calls the search measured per stage (the input of the GPU-hour projection).

    python -m benchmarks.certification [--model digits-flux] [--targets 40 45 50] [--speedups 2.8]
                                       [--trajectories 8] [--fresh 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import invardiff
from invardiff.certify import Fidelity
from invardiff.cli import builtin_settings, calibration_calls
from invardiff.holdout import holdout_measure
from invardiff.models import load_builtin

FRESH_SEED = 700_000


def fresh_calls(model: str, samples: int) -> list[dict]:
    """``samples`` samples of labels 0-9, ten per call, seeds no calibration set uses."""
    steps, guidance = builtin_settings(model)
    return [{"class_labels": [i % 10 for i in range(c * 10, min(samples, c * 10 + 10))], "num_inference_steps": steps,
             "guidance_scale": guidance, "seed": FRESH_SEED + c} for c in range((samples + 9) // 10)]  # fmt: skip


def run(model: str, targets: list[dict], trajectories: int, fresh: int) -> list[dict]:
    pipe = load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    calls = calibration_calls(model, trajectories)
    evaluate = holdout_measure(pipe, fresh_calls(model, fresh))
    rows = []
    for target in targets:
        started = time.perf_counter()
        plan = invardiff.calibrate(pipe, calls, model_id=model, **target)
        seconds = time.perf_counter() - started
        record = plan.calibration
        out_of_sample = Fidelity.of(evaluate([plan], lambda: None)[0])
        measured = record["measured"]
        selection_calls, certification_calls = len(record["holdout"]), len(record["certification"])
        rows.append({
            "model": model, **target, "candidate": record["candidate"],
            "ideal_speedup": round(plan.summary().ideal_speedup, 3),
            "certified": record["certified"], "rejected": len(record.get("rejected", [])),
            "fresh": out_of_sample.to_json(), "measured_plans": measured,
            "sampling_calls": {  # pipeline calls of the search (references included), phase 1 apart
                "phase_1": len(calls),
                "references": selection_calls + certification_calls,
                "selection": (measured["profile"] + measured["candidates"]) * selection_calls,
                "certification": measured["certification"] * certification_calls,
            },
            "seconds": round(seconds, 1),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-flux", choices=["digits-flux", "digits-dit"])
    parser.add_argument("--targets", type=float, nargs="*", default=[40.0, 45.0, 50.0], help="min_psnr values (dB)")
    parser.add_argument("--speedups", type=float, nargs="*", default=[2.8], help="target_speedup values")
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--fresh", type=int, default=50, help="out-of-sample samples")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    targets = [{"min_psnr": y} for y in args.targets] + [{"target_speedup": x} for x in args.speedups]
    rows = run(args.model, targets, args.trajectories, args.fresh)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    held = [r for r in rows if "min_psnr" in r]
    kept = sum(_db(r["fresh"]["psnr_mean"]) >= r["min_psnr"] for r in held)
    gaps = [_db(r["fresh"]["psnr_mean"]) - _db(r["certified"]["psnr_mean"]) for r in held]
    print(f"min_psnr held out of sample in {kept}/{len(held)} (mean over {args.fresh} fresh samples >= Y); "
          f"fresh minus certified mean: {np.nanmean(gaps):+.2f} dB on average")


def _db(value: float | None) -> float:
    return float("inf") if value is None else value  # None: identical outputs


if __name__ == "__main__":
    main()
