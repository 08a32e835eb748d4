"""Goal benchmark for budget plans: out of sample, against the strongest step-only baseline.

Protocol (docs/plan-quality.md): per model, ``--calls`` (8) calibration calls (labels 0-7, seeds
100-107, guidance 1.5); the budget search selects on a held-out batch (the same labels, one call, seed 100 + 1 000 003);
then every plan is evaluated on ``--samples`` fresh samples that neither calibration nor
selection saw (labels 0-9 repeated, one batch, seed 99) against full compute: per-sample PSNR
(mean and 5th percentile), SSIM, digit accuracy. At every-3's and every-4's ideal speed-up it
compares the budget plan (``target_speedup`` = that ideal) with evenly spaced steps under
``step_reuse="linear"`` at the same computed-step count (the strongest step-only rule; the goal:
the budget plan at least 1 dB better), every-k itself, and each candidate family's best
candidate on the selection set (what wins and what loses). It also counts the held-out
measurements of the search (profile, LeMiCa's jumps, candidates) against today's (profile and
step-only candidates). Ideal speed-ups only: no wall-clock.

    python benchmarks/plan_quality.py [--models digits-flux digits-dit digits-flux-shifted] \
        [--samples 50] [--threads 1] [--json docs/data/plan-quality.json]
    python benchmarks/plan_quality.py --redraw docs/data/plan-quality.json   # table and figure again

Draws ``docs/img/plan-quality.png`` (ideal speed-up / PSNR, 5th percentile as whiskers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import invardiff
from benchmarks.measures import RecordingMeasure
from invardiff import metrics
from invardiff.budget import computed_for_speedup
from invardiff.holdout import fresh_calls, holdout_measure
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.schedules import every_k_gate, every_k_plan, gate_plan, spaced_gate

GUIDANCE = 1.5
SEED = 99
KS = (3, 4)
MODELS = ("digits-flux", "digits-dit", "digits-flux-shifted")
GOAL_DB = 1.0
NEW_FAMILIES = ("lemica", "modules")  # candidate names the search gained in issue 15


def family(name: str) -> str:
    """The candidate family of a candidate name (``even+linear@9`` -> ``fixed``)."""
    base = name.split("@")[0].split("+")[0]
    if base == "modules":  # one family per module rule: modules, modules/linear, modules/linear-t
        return base + ("/" + name.split("+module-")[1] if "+module-" in name else "")
    if base == "lemica":
        return base
    if base.startswith(("drift", "sensitivity")):
        return base.split("-")[0]
    return "fixed"  # even, even+last, every-k, denser-late, denser-early


def calibration_calls(model: str, count: int = 8) -> list[dict]:
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    return [{"class_labels": [c % 10], "num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": 100 + c}
            for c in range(count)]  # fmt: skip


def evaluate(pipe, model: str, plans: dict, samples: int) -> dict:
    """Per plan: per-sample PSNR mean / 5th percentile, SSIM, accuracy on the fresh samples."""
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    labels = [i % 10 for i in range(samples)]

    def generate(plan=None):
        def call():
            return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(SEED), output_type="np").images  # fmt: skip

        if plan is None:
            return call()
        with invardiff.cached(pipe, plan):
            return call()

    full = generate()
    rows = {}
    for name, plan in plans.items():
        images = generate(plan)
        per_sample = metrics.psnr(images, full, reduction="none")
        rows[name] = {
            "ideal": plan.summary().ideal_speedup,
            "psnr_mean": float(np.mean(per_sample)),
            "psnr_p5": float(np.percentile(per_sample, 5)),
            "ssim": float(metrics.ssim(images, full)),
            "accuracy": metrics.accuracy(images, labels),
            "gate": "".join("R" if g else "." for g in plan.step_gate),
            "modules_reused": int(sum((f & ~plan.step_gate[:, None]).sum() for f in plan.modules.values())),
            "step_reuse": plan.step_reuse,
            "candidate": plan.calibration.get("candidate"),
        }
    return rows


def budget_point(pipe, calls: list[dict], model: str, k: int, recorder: RecordingMeasure, say) -> tuple[dict, dict]:
    """Plans to evaluate at every-k's ideal speed-up, and the search's record."""
    first = len(recorder.calls)
    started = time.perf_counter()
    steps = int(BUILTIN_MODELS[model]["num_inference_steps"])
    target = round(steps / int((~every_k_gate(steps, k)).sum()), 6)  # every-k's ideal: reused steps run nothing
    say(f"{model}: budget search, target_speedup={target:g} (every {k})")
    plan = invardiff.calibrate(pipe, calls, target_speedup=target, measure=recorder, model_id=model)
    seconds = time.perf_counter() - started
    record = plan.calibration
    candidates, _ = recorder.calls[-1]  # the last call measures every candidate, in record order
    by_name = dict(zip(record["candidates_psnr"], candidates))
    computed = computed_for_speedup(plan, target)
    plans = {
        f"every {k}": every_k_plan(plan, k),
        "even+linear": gate_plan(plan, spaced_gate(plan.steps, computed), step_reuse="linear"),
        "budget": plan,
    }
    best = {}
    for name, value in record["candidates_psnr"].items():
        group = family(name)
        if value is not None and (group not in best or value > record["candidates_psnr"][best[group]]):
            best[group] = name
    for group, name in best.items():
        plans[f"best {group}: {name}"] = by_name[name]
    measured = sum(len(plans_) for plans_, _ in recorder.calls[first:])
    today = steps - 2 + sum(1 for name in record["candidates_psnr"] if family(name).split("/")[0] not in NEW_FAMILIES)
    search = {
        "target_speedup": target,
        "candidate": record["candidate"],
        "selection_psnr": record["candidates_psnr"],
        "family_best": best,
        "lemica_max_jump": record.get("lemica_max_jump"),
        "lemica_jumps_measured": record.get("lemica_jumps_measured", 0),
        "measured_per_call": measured,
        "today_per_call": today,
        "cost_ratio": measured / today,
        "seconds": seconds,
    }
    return plans, search


def table(results: dict) -> str:
    lines = ["| model | budget | plan | ideal | PSNR mean | PSNR p5 | SSIM | accuracy | modules reused | step gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, points in results.items():
        for k, point in points.items():
            for name, r in point["rows"].items():
                lines.append(f"| {model} | every {k} | {name} | {r['ideal']:.2f}x | {r['psnr_mean']:.1f} dB | "
                             f"{r['psnr_p5']:.1f} dB | {r['ssim']:.4f} | {100 * r['accuracy']:.0f} % | "
                             f"{r['modules_reused']} | `{r['gate']}` |")  # fmt: skip
    lines += ["", ("| model | budget | budget - even+linear (mean) | p5 | goal >= +1 dB | chosen | measurements "
              "per held-out call (today) |"), "|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, points in results.items():
        for k, point in points.items():
            rows, search = point["rows"], point["search"]
            gain = rows["budget"]["psnr_mean"] - rows["even+linear"]["psnr_mean"]
            gain_p5 = rows["budget"]["psnr_p5"] - rows["even+linear"]["psnr_p5"]
            lines.append(f"| {model} | every {k} | {gain:+.2f} dB | {gain_p5:+.2f} dB | "
                         f"{'met' if gain >= GOAL_DB else 'not met'} | `{search['candidate']}` | "
                         f"{search['measured_per_call']} ({search['today_per_call']}, "
                         f"{search['cost_ratio']:.2f}x) |")  # fmt: skip
    return "\n".join(lines)


def draw(results: dict, img_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    styles = {"every": ("s", "tab:blue"), "even+linear": ("D", "tab:orange"), "budget": ("*", "tab:green")}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (model, points) in zip(axes[0], results.items()):
        for point in points.values():
            for i, (name, r) in enumerate(point["rows"].items()):
                marker, color = styles.get(name.split()[0], ("o", "tab:gray"))
                x, y, low = r["ideal"] + 0.02 * i, r["psnr_mean"], r["psnr_mean"] - r["psnr_p5"]  # spread: legible
                ax.errorbar(x, y, yerr=[[low], [0]], fmt=marker, color=color, ms=10 if marker == "*" else 5,
                            capsize=2, alpha=0.9)  # fmt: skip
                if name.startswith("best"):
                    ax.annotate(name.split(": ")[-1], (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set(title=f"{model}: blue every-k, orange even+linear, green budget, grey family bests",
               xlabel="ideal speed-up (x; a budget's plans drawn side by side)",
               ylabel="PSNR vs full compute, mean (whisker: 5th pct.)")  # fmt: skip
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    path = img_dir / "plan-quality.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def models_to_run(parser: argparse.ArgumentParser, requested: list[str] | None) -> list[str]:
    """The requested models (an unknown one is an error), or the default ones this checkout has."""
    if requested is None:
        missing = [m for m in MODELS if m not in BUILTIN_MODELS]
        for name in missing:
            print(f"note: {name} is not a built-in model in this checkout; skipped", file=sys.stderr)
        return [m for m in MODELS if m in BUILTIN_MODELS]
    for name in requested:
        if name not in BUILTIN_MODELS:
            hint = " (it lands with the shifted-schedule work of issue 15)" if name == "digits-flux-shifted" else ""
            parser.error(f"{name} is not a built-in model in this checkout{hint}; known: {', '.join(BUILTIN_MODELS)}")
    return requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help=f"default: those of {', '.join(MODELS)} this checkout has")
    parser.add_argument("--samples", type=int, default=50, help="fresh evaluation samples (default 50)")
    parser.add_argument("--calls", type=int, default=8, help="calibration calls, and held-out calls (default 8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    parser.add_argument("--redraw", type=Path, nargs="+", help="only print and draw saved JSON runs")
    args = parser.parse_args()
    if args.redraw:
        results = {m: r for path in args.redraw for m, r in json.loads(path.read_text())["results"].items()}
        print(table(results))
        print(f"wrote {draw(results, args.img_dir)}")
        return
    if args.samples < 1 or args.calls < 1:
        parser.error("--samples and --calls must be at least 1")
    models = models_to_run(parser, args.models)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {}
    for model in models:
        pipe = load_builtin(model)
        pipe.set_progress_bar_config(disable=True)
        calls = calibration_calls(model, args.calls)
        batched = [{**calls[0], "class_labels": [label for call in calls for label in call["class_labels"]]}]
        recorder = RecordingMeasure(holdout_measure(pipe, fresh_calls(batched, calls)))  # one batch, a fresh seed
        results[model] = {}
        for k in KS:
            plans, search = budget_point(pipe, calls, model, k, recorder, say=lambda m: print(m, flush=True))
            print(f"{model}: evaluating {len(plans)} plans on {args.samples} fresh samples", flush=True)
            results[model][k] = {"rows": evaluate(pipe, model, plans, args.samples), "search": search}
            if args.json:
                args.json.write_text(json.dumps({"samples": args.samples, "calls": args.calls, "results": results}, indent=1))
        print(table({model: results[model]}), flush=True)
    print(f"wrote {draw(results, args.img_dir)}")


if __name__ == "__main__":
    main()
