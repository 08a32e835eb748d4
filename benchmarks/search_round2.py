"""Round 2 of the budget search: module rules and the selection set's size, out of sample.

Per model and every-k's ideal speed-up (k = 3, 4): a budget search (8 calibration calls, labels
0-7, seeds 100-107, guidance 1.5) selecting on 16 held-out samples (labels 0-7 twice, seeds
200-215) with module candidates under every rule of ``--module-rules``; each candidate's
per-sample figures are kept, so the ranking on the first 8 samples and on all 16 can be compared.
Then on 32 fresh samples (labels 0-9, seeds 900000+): the plan each ranking picks, each module
rule's best module candidate, and even+linear (mean / 5th percentile PSNR against full compute):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/search_round2.py --json out.json \\
        [--models digits-flux digits-flux-shifted digits-dit] [--module-rules hold linear linear-t]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import invardiff
from invardiff import module_axis
from invardiff.budget import computed_for_speedup
from invardiff.holdout import holdout_measure
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.schedules import every_k_gate, gate_plan, spaced_gate

GUIDANCE = 1.5


def figures(values) -> list[float]:
    return [round(float(np.mean(values)), 2), round(float(np.percentile(values, 5, method="lower")), 2)]


def module_rule(name: str) -> str | None:
    if not name.startswith("modules"):
        return None
    return name.split("+module-")[1] if "+module-" in name else "hold"


def point(pipe, model: str, k: int, measure, last: dict, evaluate) -> dict:
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    calls = [{"class_labels": [c], "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": 100 + c}
             for c in range(8)]  # fmt: skip
    target = round(steps / int((~every_k_gate(steps, k)).sum()), 6)
    plan = invardiff.calibrate(pipe, calls, target_speedup=target, measure=measure)
    names = list(plan.calibration["candidates_psnr"])
    plans = dict(zip(names, last["plans"]))
    values = {name: np.asarray(v) for name, v in zip(names, last["values"])}
    pick8 = max(names, key=lambda n: values[n][:8].mean())
    pick16 = max(names, key=lambda n: values[n].mean())
    chosen = {"even+linear": gate_plan(plan, spaced_gate(steps, computed_for_speedup(plan, target)), step_reuse="linear"),
              f"pick8 {pick8}": plans[pick8], f"pick16 {pick16}": plans[pick16]}  # fmt: skip
    for rule in dict.fromkeys(filter(None, map(module_rule, names))):
        best = max((n for n in names if module_rule(n) == rule), key=lambda n: values[n].mean())
        chosen[f"modules/{rule} {best}"] = plans[best]
    fresh = evaluate(list(chosen.values()), lambda: None)
    return {"target": target, "measured": plan.calibration["measured"],
            "selection16": {n: round(float(v.mean()), 2) for n, v in values.items()},
            "selection8": {n: round(float(v[:8].mean()), 2) for n, v in values.items()},
            "fresh32": {n: figures(v) for n, v in zip(chosen, fresh)}}  # fmt: skip


def remembering(inner, last: dict):
    """A measure answering a plan measured before (the profile at the second k) from memory;
    ``last`` holds the latest call's plans and values."""
    memory: dict[str, list[float]] = {}

    def measure(plans, done):
        for plan in plans:
            if plan.sha256 not in memory:
                memory[plan.sha256] = inner([plan], lambda: None)[0]
            done()
        last.update(plans=plans, values=[memory[p.sha256] for p in plans])
        return last["values"]

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-flux", "digits-flux-shifted", "digits-dit"])
    parser.add_argument("--module-rules", nargs="+", default=["hold", "linear", "linear-t"])
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module_axis.MODULE_RULES = tuple(args.module_rules)  # module_candidates' default: read at call time
    results: dict = {}
    for model in args.models:
        pipe = load_builtin(model)
        pipe.set_progress_bar_config(disable=True)
        steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
        selection = [{"class_labels": [i % 8], "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": 200 + i}
                     for i in range(16)]  # fmt: skip
        fresh = [{"class_labels": [i % 10], "num_inference_steps": steps, "guidance_scale": GUIDANCE,
                  "seed": 900000 + i} for i in range(32)]  # fmt: skip
        last: dict = {}
        measure = remembering(holdout_measure(pipe, selection), last)
        evaluate = holdout_measure(pipe, fresh)
        results[model] = {k: point(pipe, model, k, measure, last, evaluate) for k in (3, 4)}
        print(model, json.dumps({k: r["fresh32"] for k, r in results[model].items()}), flush=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
