"""Plan quality on the built-in models: reference rules, every-k schedules and budget plans.

Protocol (docs/plan-quality.md): 8 calibration calls (labels 0-7, seeds 100-107, guidance 1.5);
30 evaluation samples (labels 0-9 x 3, one batch, seed 99) compared with full compute: PSNR,
SSIM, digit accuracy; speed-up = full / cached wall-clock, interleaved, median of --repeats.
Budget plans are calibrated through the public API with ``target_speedup`` set to each every-k
plan's ideal speed-up; they pick their candidate on the calibration calls' held-out seeds,
never on the evaluation samples.

    python benchmarks/plan_quality.py [--models digits-flux digits-dit] [--repeats 3] [--json out.json]
    python benchmarks/plan_quality.py --redraw out.json   # the figures from a saved run (several merged)

Also draws ``docs/img/plan-quality.png`` (speed-up / PSNR scatter) and
``docs/img/plan-quality-step-error.png`` (per-step latent error against full compute).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import invardiff
from invardiff import metrics
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.schedules import every_k_plan

GUIDANCE = 1.5
LABELS = [i % 10 for i in range(30)]
SEED = 99
KS = (2, 3, 4)
REFERENCE_RULES = {
    "fast preset": {"preset": "fast"},
    "slow preset": {"preset": "slow"},
    "q_step=0.5": {"q_step": 0.5},
    "q_step=0.8": {"q_step": 0.8},
}


def calibration_calls(model: str) -> list[dict]:
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    return [{"class_labels": [c], "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": 100 + c}
            for c in range(8)]  # fmt: skip


def generate(pipe, model: str, plan=None, trace: list | None = None) -> np.ndarray:
    """The evaluation batch, full compute (``plan`` None) or cached; ``trace`` collects latents."""
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])

    def call():
        if trace is not None:
            step = pipe.scheduler.step

            def traced(*args, **kwargs):
                out = step(*args, **kwargs)
                trace.append((out[0] if isinstance(out, tuple) else out.prev_sample).clone())
                return out

            pipe.scheduler.step = traced
        try:
            return pipe(class_labels=LABELS, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(SEED), output_type="np").images  # fmt: skip
        finally:
            if trace is not None and plan is None:
                del pipe.scheduler.step  # (the cache removes its own wrapper and ours on exit)

    if plan is None:
        return call()
    with invardiff.cached(pipe, plan):
        return call()


def plans_for(pipe, model: str, say) -> dict[str, invardiff.CachePlan]:
    calls = calibration_calls(model)
    plans = {}
    for name, rules in REFERENCE_RULES.items():
        say(f"{model}: reference rules, {name}")
        plans[name] = invardiff.calibrate(pipe, calls, mode="reference", model_id=model, **rules)
    template = plans["fast preset"]
    for k in KS:
        plans[f"every {k}"] = every_k_plan(template, k)
    for k in KS:
        target = plans[f"every {k}"].summary().ideal_speedup
        say(f"{model}: budget, target_speedup={target:g}")
        plans[f"budget x{target:.2f} (vs every {k})"] = invardiff.calibrate(pipe, calls, target_speedup=target,
                                                                          model_id=model)  # fmt: skip
    return plans


def measure(pipe, model: str, plans: dict, repeats: int) -> tuple[dict, dict]:
    """Rows of figures per plan, and per-step latent RMS error for the step-error plot."""
    full_trace: list = []
    full = generate(pipe, model, trace=full_trace)
    rows, step_error = {}, {}
    times = {name: ([], []) for name in plans}
    for _ in range(repeats):  # interleaved: full then cached, plan after plan
        for name, plan in plans.items():
            t0 = time.perf_counter()
            generate(pipe, model)
            t1 = time.perf_counter()
            generate(pipe, model, plan)
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t1)
    for name, plan in plans.items():
        trace: list = []
        images = generate(pipe, model, plan, trace)
        step_error[name] = [float((a - b).pow(2).mean().sqrt()) for a, b in zip(trace, full_trace)]
        full_s, cached_s = times[name]
        rows[name] = {
            "ideal": plan.summary().ideal_speedup,
            "speedup": float(np.median(full_s) / np.median(cached_s)),
            "psnr": float(metrics.psnr(images, full)),
            "ssim": float(metrics.ssim(images, full)),
            "accuracy": metrics.accuracy(images, LABELS),
            "gate": "".join("R" if g else "." for g in plan.step_gate),
            "candidate": plan.calibration.get("candidate"),
        }
    rows["full compute"] = {"ideal": 1.0, "speedup": 1.0, "psnr": float("inf"), "ssim": 1.0,
                            "accuracy": metrics.accuracy(full, LABELS), "gate": "", "candidate": None}  # fmt: skip
    return rows, step_error


def table(results: dict) -> str:
    lines = ["| model | plan | ideal | measured speed-up | PSNR | SSIM | accuracy | step gate |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, rows in results.items():
        for name, r in sorted(rows.items(), key=lambda item: item[1]["ideal"]):
            lines.append(f"| {model} | {name} | {r['ideal']:.2f}x | {r['speedup']:.2f}x | {r['psnr']:.1f} dB | "
                         f"{r['ssim']:.4f} | {100 * r['accuracy']:.0f} % | `{r['gate']}` |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, errors: dict, img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    families = {"every": ("s", "tab:blue"), "budget": ("*", "tab:green")}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items()):
        for name, r in rows.items():
            if name == "full compute":
                continue
            marker, color = families.get(name.split()[0], ("o", "tab:red"))
            ax.scatter(r["speedup"], r["psnr"], marker=marker, color=color, s=90 if marker == "*" else 45)
            ax.annotate(name.split(" (")[0], (r["speedup"], r["psnr"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set(title=f"{model}: red = reference rules, blue = every k, green = budget",
               xlabel="measured speed-up (x)", ylabel="PSNR vs full compute (dB)")  # fmt: skip
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    scatter = img_dir / "plan-quality.png"
    fig.tight_layout()
    fig.savefig(scatter, dpi=110)
    fig, axes = plt.subplots(1, len(errors), figsize=(6 * len(errors), 4.5), squeeze=False)
    for ax, (model, curves) in zip(axes[0], errors.items()):
        for name in ["fast preset", *(f"every {k}" for k in KS)]:
            ax.plot(curves[name], label=name, lw=2 if name == "fast preset" else 1)
        ax.set(title=f"{model}: latent RMS error against full compute", xlabel="step", ylabel="RMS error")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    steps = img_dir / "plan-quality-step-error.png"
    fig.tight_layout()
    fig.savefig(steps, dpi=110)
    return [scatter, steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-flux", "digits-dit"], choices=list(BUILTIN_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    parser.add_argument("--redraw", type=Path, nargs="+", help="only print and draw saved JSON runs")
    args = parser.parse_args()
    if args.redraw:
        saved = [json.loads(path.read_text()) for path in args.redraw]
        results = {m: r for run in saved for m, r in run["results"].items()}
        print(table(results))
        for path in draw(results, {m: e for run in saved for m, e in run["step_error"].items()}, args.img_dir):
            print(f"wrote {path}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results, errors = {}, {}
    for model in args.models:
        pipe = load_builtin(model)
        pipe.set_progress_bar_config(disable=True)
        plans = plans_for(pipe, model, say=lambda m: print(m, flush=True))
        results[model], errors[model] = measure(pipe, model, plans, args.repeats)
        print(table({model: results[model]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"results": results, "step_error": errors}, indent=1))
    for path in draw(results, errors, args.img_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
