"""The budget search's cost with batched and one-at-a-time held-out measurements, side by side.

In-process ``invardiff.calibrate(pipe, calls, target_speedup=2.8)`` on digits-flux (8 calibration
calls, labels 0-7, seeds 100-107, guidance 1.5; default selection and certification sets), its
measures built with ``holdout_measure(pipe, calls)`` (batched) and ``max_batch=1``:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/search_cost.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import invardiff
from invardiff.holdout import held_out_sets, holdout_measure
from invardiff.models import BUILTIN_MODELS, load_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-flux")
    parser.add_argument("--target-speedup", type=float, default=2.8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_builtin(args.model)
    pipe.set_progress_bar_config(disable=True)
    steps = int(BUILTIN_MODELS[args.model]["num_inference_steps"])
    calls = [{"class_labels": [c], "num_inference_steps": steps, "guidance_scale": 1.5, "seed": 100 + c}
             for c in range(8)]  # fmt: skip
    selection, certification = held_out_sets(calls)
    results = {}
    for name, max_batch in (("batched", None), ("one call at a time", 1)):
        started = time.perf_counter()
        measure = holdout_measure(pipe, selection, max_batch=max_batch)
        certify = holdout_measure(pipe, certification, max_batch=max_batch)
        references = time.perf_counter()
        plan = invardiff.calibrate(pipe, calls, target_speedup=args.target_speedup, measure=measure, certify=certify)
        record = plan.calibration
        results[name] = {"references_s": round(references - started, 1),
                         "search_s": round(time.perf_counter() - references, 1), "candidate": record["candidate"],
                         "measured": record["measured"], "certified": record["certified"]}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
