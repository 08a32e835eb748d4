"""Engine overhead and plan efficiency, measured side by side in one run.

For a transformer where block compute dominates, times a full sampling loop three ways,
interleaved: untouched, under an all-compute plan (pure hook overhead; target < 2 %), and
under a reference plan (measured speed-up vs the plan's FLOP-ideal; target >= 0.95).

    python benchmarks/engine.py --arch dit --width 256 --batch 4           # CPU
    python benchmarks/engine.py --arch flux --width 1024 --device cuda --dtype bfloat16
    python benchmarks/engine.py --arch dit --step-reuse linear   # the plan with extrapolated steps

``--step-reuse linear`` also times the plan under ``step_reuse="linear"`` (interleaved with the
rest) and reports its cost over ``"hold"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import invardiff
from invardiff import Geometry, all_compute_plan, cached
from invardiff.models.tiny import tiny_dit_transformer, tiny_flux_transformer

PLANS = Path(__file__).resolve().parents[1] / "reference" / "official-plans"
# Reference plans (DiT-XL/2, FLUX.1-dev) on random models of their shape: a deliberate reuse.
REUSE = {"dtype", "guidance"}
DIT_PLAN = "dit_cache_books_stp50_n0.0_sth0.63_msa0.22_mlp0.22.json"
FLUX_PLAN = "flux_cache_books_stp28_n0.1_th0.7_attn0.68_ff0.68_ctxff0.68_sattn0.68_smlp0.68.json"


def build(args):
    """A (transformer, scheduler) pair, the inputs of one call, and the plan with this geometry."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.arch == "dit":
        plan = invardiff.load_plan(args.plan or PLANS / DIT_PLAN)
        side = args.tokens_side
        model = tiny_dit_transformer(
            num_layers=28, width=args.width, sample_size=side, num_heads=args.heads
        )
        inputs = {"hidden_states": torch.randn(args.batch, 4, side, side),
                  "class_labels": torch.arange(args.batch) % 1000}  # fmt: skip
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
        geometry = Geometry(dim=args.width, tokens=(side // 2) ** 2)
    else:
        plan = invardiff.load_plan(args.plan or PLANS / FLUX_PLAN)
        side = args.tokens_side
        model = tiny_flux_transformer(num_double=19, num_single=38, width=args.width, num_heads=args.heads,
                                      in_channels=16, joint_attention_dim=64, pooled_projection_dim=64)  # fmt: skip
        tokens, context = side * side, args.context_tokens
        inputs = {
            "hidden_states": torch.randn(args.batch, tokens, 16),
            "encoder_hidden_states": torch.randn(args.batch, context, 64),
            "pooled_projections": torch.randn(args.batch, 64),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                                  indexing="ij"), -1).reshape(-1, 3).float(),
            "txt_ids": torch.zeros(context, 3),
        }  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler()
        geometry = Geometry(dim=args.width, tokens=tokens, context_tokens=context)
    model = model.to(device=device, dtype=dtype)
    inputs = {k: v.to(device) if k.endswith("ids") or k == "class_labels" else v.to(device, dtype)
              for k, v in inputs.items()}  # fmt: skip
    return SimpleNamespace(transformer=model, scheduler=scheduler), inputs, replace(plan, geometry=geometry)


def sample(pipe, inputs, steps: int) -> torch.Tensor:
    """A sampling loop like DiTPipeline's / FluxPipeline's: one transformer call per step."""
    model, scheduler = pipe.transformer, pipe.scheduler
    x = inputs["hidden_states"]
    rest = {k: v for k, v in inputs.items() if k != "hidden_states"}
    flux = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    # DiTPipeline keeps the schedule on the CPU; FluxPipeline puts it on the device
    scheduler.set_timesteps(steps, device=x.device if flux else None)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            timestep = t.to(x.device).expand(x.shape[0])
            out = model(hidden_states=x, timestep=timestep / 1000 if flux else timestep, return_dict=False, **rest)[0]
            x = scheduler.step(out[:, : x.shape[1]], t, x).prev_sample
    return x


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["dit", "flux"], default="dit")
    parser.add_argument("--plan", type=Path, help="plan file (default: a reference plan)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--tokens-side",
        type=int,
        default=16,
        help="DiT: latent side (tokens = (side/2)^2); FLUX: image tokens side",
    )
    parser.add_argument("--context-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--step-reuse", choices=["hold", "linear"], default="hold")
    args = parser.parse_args()
    device = torch.device(args.device)
    pipe, inputs, plan = build(args)
    baseline_plan = all_compute_plan(plan.arch, plan.steps, plan.layer_counts())

    def untouched():
        sample(pipe, inputs, plan.steps)

    def under(p):
        def run():
            with cached(pipe, p, allow_mismatch=REUSE):
                sample(pipe, inputs, plan.steps)

        return run

    untouched()  # warm-up
    under(plan)()
    runs = {"untouched": untouched, "all_compute": under(baseline_plan), "plan": under(plan)}
    if args.step_reuse != "hold":
        runs["plan_" + args.step_reuse] = under(plan.with_step_reuse(args.step_reuse))
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    median = {k: statistics.median(v) for k, v in times.items()}
    summary = plan.summary(batch=args.batch)
    speedup = median["untouched"] / median["plan"]
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "arch": plan.arch,
        "plan": plan.calibration.get("params", {}),
        "width": args.width,
        "tokens": plan.geometry.tokens,
        "batch": args.batch,
        "dtype": args.dtype,
        "median_s": {k: round(v, 4) for k, v in median.items()},
        "overhead_all_compute_pct": round(
            100 * (median["all_compute"] / median["untouched"] - 1), 2
        ),
        "speedup": round(speedup, 3),
        "ideal_speedup": summary.ideal_speedup,
        "speedup_over_ideal": round(speedup / summary.ideal_speedup, 3),
        "peak_cache_mib": round(summary.peak_cache_bytes / 2**20, 1),
    }
    if args.step_reuse != "hold":
        extra = median["plan_" + args.step_reuse] / median["plan"] - 1
        result[f"{args.step_reuse}_over_hold_pct"] = round(100 * extra, 2)
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
