"""Does a certified fidelity target hold on samples nobody used? And what does the search cost?

Protocol (docs/certification.md): calibrate a built-in model with the ``invardiff`` command's
calls (``--trajectories`` calls, label i % 10, seed 1000 + i, the model's guidance) for
``min_psnr=Y`` per ``--targets``, ``min_psnr_p5=Z`` per ``--p5-targets`` and ``target_speedup``
per ``--speedups``, with the default selection and certification sets (the calibration calls
with fresh seeds each, the certification's repeated to 45 samples or more for a 5th-percentile
floor; a plan measured by an earlier target of the same model, e.g. the step profile, is answered
from memory: the same figures, and the search still counts it). Then measure
the plan on ``--fresh`` samples (labels 0-9, seeds from 700000: no set of the search used
them) and report the certified and fresh mean and 5th percentile, and the plans and sampling
calls the search measured per stage (the input of the GPU-hour projection).

    python -m benchmarks.certification [--model digits-flux ...] [--targets 40 45 50] [--p5-targets 40]
                                       [--speedups 2.8] [--trajectories 8] [--fresh 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import invardiff
from benchmarks.measures import RecordingMeasure
from invardiff.budget_calibration import certification_samples
from invardiff.certify import Fidelity
from invardiff.cli import builtin_settings, calibration_calls
from invardiff.holdout import held_out_sets, holdout_measure
from invardiff.models import BUILTIN_MODELS, load_builtin

FRESH_SEED = 700_000


def fresh_calls(model: str, samples: int) -> list[dict]:
    """``samples`` samples of labels 0-9, ten per call, seeds no calibration set uses."""
    steps, guidance = builtin_settings(model)
    return [{"class_labels": [i % 10 for i in range(c * 10, min(samples, c * 10 + 10))], "num_inference_steps": steps,
             "guidance_scale": guidance, "seed": FRESH_SEED + c} for c in range((samples + 9) // 10)]  # fmt: skip


def run(model: str, targets: list[dict], trajectories: int, fresh: int, out=None) -> list[dict]:
    """One row per target; each row is passed to ``out`` as soon as it is measured."""
    pipe = load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    calls = calibration_calls(model, trajectories)
    sets = {n: held_out_sets(calls, min_samples=n) for n in {certification_samples(t) for t in targets}}
    selection = next(iter(sets.values()))[0]  # the defaults, measured once for every target
    measure = RecordingMeasure(holdout_measure(pipe, selection))
    certifiers = {n: (RecordingMeasure(holdout_measure(pipe, cert)), cert) for n, (_, cert) in sets.items()}
    evaluate = holdout_measure(pipe, fresh_calls(model, fresh))
    rows = []
    for target in targets:
        certify, certification = certifiers[certification_samples(target)]
        started, first = time.perf_counter(), (len(measure.calls), len(certify.calls))
        plan = invardiff.calibrate(pipe, calls, model_id=model, measure=measure, certify=certify, **target)
        seconds = time.perf_counter() - started
        record = plan.calibration
        out_of_sample = Fidelity.of(evaluate([plan], lambda: None)[0])
        measured = record["measured"]
        selection_calls, certification_calls = len(selection), len(certification)
        rows.append({
            "model": model, **target, "candidate": record["candidate"],
            "ideal_speedup": round(plan.summary().ideal_speedup, 3),
            "certified": record["certified"], "rejected": len(record.get("rejected", [])),
            "fresh": out_of_sample.to_json(), "measured_plans": measured,
            "sampling_calls": {  # pipeline calls of the search (references included), phase 1 apart
                "phase_1": len(calls),
                "references": selection_calls + certification_calls,
                "selection": (measured["profile"] + measured["jumps"] + measured["candidates"]) * selection_calls,
                "certification": measured["certification"] * certification_calls,
            },
            # the same calls weighted by the block work they execute (a cached plan's executed fraction)
            "block_work_calls": {"selection": block_work(measure, first[0]) * selection_calls,
                                 "certification": block_work(certify, first[1]) * certification_calls},
            "seconds": round(seconds, 1),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        if out:
            out(rows[-1])
    return rows


def block_work(recorder: RecordingMeasure, first: int) -> float:
    """The executed fraction of block work summed over the plans measured since call ``first``."""
    return round(sum(plan.summary().executed_fraction for plans, _ in recorder.calls[first:] for plan in plans), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["digits-flux"], choices=list(BUILTIN_MODELS))
    parser.add_argument("--targets", type=float, nargs="*", default=[40.0, 45.0, 50.0], help="min_psnr values (dB)")
    parser.add_argument("--p5-targets", type=float, nargs="*", default=[40.0], help="min_psnr_p5 values (dB)")
    parser.add_argument("--speedups", type=float, nargs="*", default=[2.8], help="target_speedup values")
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--fresh", type=int, default=50, help="out-of-sample samples")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    targets = ([{"min_psnr": y} for y in args.targets] + [{"min_psnr_p5": z} for z in args.p5_targets]
               + [{"target_speedup": x} for x in args.speedups])  # fmt: skip
    rows: list[dict] = []

    def keep(row: dict) -> None:  # every row on disk as soon as it is measured
        rows.append(row)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=1)

    for model in args.model:
        run(model, targets, args.trajectories, args.fresh, out=keep)
    promises = (("min_psnr", "psnr_mean", "psnr_mean"), ("min_psnr_p5", "psnr_p5", "psnr_p5_bound"))
    for key, figure, promised in promises:  # the figure measured fresh, the certified one it checks
        held = [r for r in rows if key in r]
        if held:
            kept = sum(_db(r["fresh"][figure]) >= r[key] for r in held)
            gaps = [_db(r["fresh"][figure]) - _db(r["certified"][promised]) for r in held]
            print(f"{key} held out of sample in {kept}/{len(held)} ({figure} over {args.fresh} fresh samples >= "
                  f"target); fresh minus certified: {np.nanmean(gaps):+.2f} dB on average")


def _db(value: float | None) -> float:
    return float("inf") if value is None else value  # None: identical outputs


if __name__ == "__main__":
    main()
