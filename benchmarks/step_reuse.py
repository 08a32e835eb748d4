"""Whole-step reuse on the built-in models: every-k with H held ("hold") or extrapolated ("linear").

Protocol (docs/step-reuse.md): 30 samples (labels 0-9 x 3, one batch, seed 99, guidance 1.5;
digits-flux Euler-28, digits-dit DDIM-50) compared with full compute: PSNR, SSIM, digit
accuracy (against the labels) and agreement (same digit as full compute, by the committed
classifier), and the plan's FLOP-based ideal speed-up. Noise-free: no wall-clock timing.

    python benchmarks/step_reuse.py [--models digits-flux digits-dit] [--ks 2 3 4] [--presets fast slow]
                                    [--json out.json]

``--presets``: also the reference rules' plans (step gate and module reuse; 8 calibration
calls: labels 0-7, seeds 100-107) under both rules, in the rows with ``k`` = the preset name.
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
from invardiff.schedules import every_k_plan

GUIDANCE = 1.5
LABELS = [i % 10 for i in range(30)]
SEED = 99


def every_k(template: CachePlan, k: int, step_reuse: str = "hold") -> CachePlan:
    """Compute steps 0, k, 2k, ... and the last; reuse the steps between whole."""
    return every_k_plan(template, k).with_step_reuse(step_reuse)


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
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])

    def call():
        return pipe(class_labels=LABELS, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), output_type="np").images  # fmt: skip

    if plan is None:
        return call()
    with invardiff.cached(pipe, plan):
        return call()


def reference_plan(pipe, model: str, preset: str) -> CachePlan:
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    calls = [{"class_labels": [c], "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": 100 + c}
             for c in range(8)]  # fmt: skip
    return invardiff.calibrate(pipe, calls, preset=preset, model_id=model)


def measure(model: str, ks: list[int], presets: list[str], say) -> list[dict]:
    pipe = load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    full = generate(pipe, model)
    full_digits = metrics.classify(full)
    template = template_for(pipe, model)
    rows = [{"model": model, "k": 1, "ideal": 1.0, "full": {"psnr": None, "ssim": 1.0,
                                                          "accuracy": metrics.accuracy(full, LABELS)}}]
    say(rows[0])
    plans = {k: every_k(template, k) for k in ks}
    plans |= {f"{preset} preset": reference_plan(pipe, model, preset) for preset in presets}
    for k, plan in plans.items():
        row = {"model": model, "k": k, "ideal": plan.summary().ideal_speedup}
        for rule in ("hold", "linear"):
            images = generate(pipe, model, plan.with_step_reuse(rule))
            row[rule] = {"psnr": float(metrics.psnr(images, full)), "ssim": float(metrics.ssim(images, full)),
                         "accuracy": metrics.accuracy(images, LABELS),
                         "agreement": float(np.mean(metrics.classify(images) == full_digits))}  # fmt: skip
        say(row)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | plan | ideal | hold: PSNR / SSIM / acc / agree | linear: PSNR / SSIM / acc / agree | gain |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    def cell(r: dict) -> str:
        return f"{r['psnr']:.1f} dB / {r['ssim']:.4f} / {r['accuracy']:.2f} / {r['agreement']:.2f}"

    for r in rows:
        if "full" in r:
            lines.append(f"| {r['model']} | full compute | 1.00x | accuracy {r['full']['accuracy']:.2f} | | |")
            continue
        gain = r["linear"]["psnr"] - r["hold"]["psnr"]
        name = f"every {r['k']}" if isinstance(r["k"], int) else r["k"]
        lines.append(f"| {r['model']} | {name} | {r['ideal']:.2f}x | {cell(r['hold'])} | {cell(r['linear'])} | "
                     f"{gain:+.1f} dB |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILTIN_MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--presets", nargs="*", default=[], choices=["fast", "slow"])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [row for model in args.models for row in measure(model, args.ks, args.presets, lambda r: print(r, flush=True))]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
