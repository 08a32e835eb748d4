"""Reuse rules on the built-in models: what a reused step's H is, and what a reused module returns.

Protocol (docs/step-reuse.md): 50 fresh samples (labels i % 10, sample i on its own generator
seeded 5_000_000 + i: no calibration or held-out set uses these seeds), one batch, each
model's protocol steps and guidance, compared with full compute: PSNR per sample (mean and
5th percentile) and agreement (same digit as full compute, by the committed classifier), and
the plan's FLOP-based ideal speed-up. Noise-free: no wall-clock timing.

    python benchmarks/step_reuse.py [--models digits-flux digits-flux-shifted digits-dit] [--ks 2 3 4]
                                    [--rules hold linear linear-t quadratic-t] [--presets fast slow]
                                    [--json out.json]

Every-k plans (steps 0, k, 2k, ... and the last computed) run under each step rule.
``--presets``: also the reference rules' plans (step gate and module reuse; 8 calibration calls:
labels 0-7, seeds 100-107) under each module rule (``MODULE_REUSE``) with step rules hold
and linear.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import invardiff
from invardiff import CachePlan, PlanTarget, all_compute_plan, metrics
from invardiff.architectures import layer_lists
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.plan import MODULE_REUSE, STEP_REUSE
from invardiff.schedules import every_k_plan

SAMPLES = 50
LABELS = [i % 10 for i in range(SAMPLES)]
SEED = 5_000_000


def template_for(pipe, model: str) -> CachePlan:
    """A plan that computes everything, for ``model``'s layers and step count."""
    arch = str(BUILTIN_MODELS[model]["architecture"])
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    counts = {name: len(getattr(pipe.transformer, name)) for name in layer_lists(arch)}
    if arch == "dit":
        layers = {"attn": counts["transformer_blocks"], "mlp": counts["transformer_blocks"]}
    else:
        double, single = counts["transformer_blocks"], counts["single_transformer_blocks"]
        layers = {"attn": double, "context_attn": double, "ff": double, "context_ff": double,
                  "single_attn": single, "single_mlp": single}  # fmt: skip
    return all_compute_plan(arch, steps, layers, target=PlanTarget(model_id=model))


def generate(pipe, model: str, plan: CachePlan | None = None) -> np.ndarray:
    settings = BUILTIN_MODELS[model]

    def call():
        return pipe(class_labels=LABELS, num_inference_steps=int(settings["num_inference_steps"]),
                    guidance_scale=float(settings["guidance_scale"]), output_type="np",
                    generator=[torch.Generator().manual_seed(SEED + i) for i in range(SAMPLES)]).images  # fmt: skip

    if plan is None:
        return call()
    with invardiff.cached(pipe, plan):
        return call()


def reference_plan(pipe, model: str, preset: str) -> CachePlan:
    settings = BUILTIN_MODELS[model]
    calls = [{"class_labels": [c], "num_inference_steps": int(settings["num_inference_steps"]),
              "guidance_scale": float(settings["guidance_scale"]), "seed": 100 + c} for c in range(8)]  # fmt: skip
    return invardiff.calibrate(pipe, calls, preset=preset, model_id=model)


def fidelity(images: np.ndarray, full: np.ndarray, full_digits: np.ndarray) -> dict[str, float]:
    values = metrics.psnr(images, full, reduction="none")
    return {"psnr": float(values.mean()), "p5": float(np.percentile(values, 5)),
            "agreement": float(np.mean(metrics.classify(images) == full_digits))}  # fmt: skip


def measure(model: str, ks: list[int], rules: list[str], presets: list[str], say) -> list[dict]:
    pipe = load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    full = generate(pipe, model)
    full_digits = metrics.classify(full)
    template = template_for(pipe, model)
    rows = []
    plans = {f"every {k}": (every_k_plan(template, k), [(rule, "hold") for rule in rules]) for k in ks}
    pairs = [(step, module) for step in ("hold", "linear") for module in MODULE_REUSE]
    plans |= {f"{preset} preset": (reference_plan(pipe, model, preset), pairs) for preset in presets}
    for name, (plan, variants) in plans.items():
        row = {"model": model, "plan": name, "ideal": plan.summary().ideal_speedup, "rules": {}}
        for step, module in variants:
            images = generate(pipe, model, plan.with_step_reuse(step).with_module_reuse(module))
            row["rules"][f"{step}/{module}"] = fidelity(images, full, full_digits)
        say(row)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """One markdown table: a column per rule pair seen, cells 'mean / p5 dB'."""
    columns = list(dict.fromkeys(key for r in rows for key in r["rules"]))
    head = "| model | plan | ideal | " + " | ".join(f"{c} (mean / p5 dB)" for c in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    for r in rows:
        cells = [f"{r['rules'][c]['psnr']:.1f} / {r['rules'][c]['p5']:.1f}" if c in r["rules"] else "" for c in columns]
        lines.append(f"| {r['model']} | {r['plan']} | {r['ideal']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILTIN_MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--rules", nargs="+", default=list(STEP_REUSE), choices=STEP_REUSE)
    parser.add_argument("--presets", nargs="*", default=[], choices=["fast", "slow"])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [row for model in args.models
            for row in measure(model, args.ks, args.rules, args.presets, lambda r: print(r, flush=True))]  # fmt: skip
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
