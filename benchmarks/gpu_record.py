"""The GPU record: hook overhead, speed-up against the plan's ideal, regional torch.compile and
peak memory, for FLUX.1-dev and DiT-XL/2 shapes with random weights and the official plans.

    python -m benchmarks.gpu_record                      # on a CUDA machine (a few minutes)
    python -m benchmarks.gpu_record --tiny               # the same script at tiny width on the CPU
    python -m benchmarks.gpu_record --cases dit-b8 --repeats 2 --no-compile

Cases: ``flux`` (19 + 38 blocks, width 3072, 4096 image + 512 text tokens, bfloat16, batch 1,
28 steps), ``dit-b8`` and ``dit-b32`` (28 blocks x 1152, 256 tokens, float16, batch 8 / 32,
50 steps). ``--tiny``: width 64, 64 image (16 text) tokens, float32, CPU, same layer counts.

Per case, six modes are timed interleaved (order rotating each round, after a warm-up round):
untouched, all-compute plan (pure hook overhead) and official plan, each eager and under
regional ``torch.compile`` (every block and every module a plan can reuse is its own region;
the runtime's module hooks are graph breaks, so the plan's Python decisions never enter a
graph). Reported: overhead, measured speed-up over the plan's FLOP ideal (eager and on top of
compile), correctness (eager all-compute bit-identical to untouched; compiled all-compute
against eager within compile's own difference), recompiles after warm-up (dynamo's graph
count), and on CUDA the peak memory increase against the plan's predicted cache bytes. Prints
JSON; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.engine import DIT_PLAN, FLUX_PLAN, PLANS, REUSE, build, sample, timed
from invardiff import all_compute_plan, cached
from invardiff.architectures import MODULE_KINDS, layer_lists
from invardiff.runtime import _ModuleHook

CASES: dict[str, dict[str, Any]] = {
    "flux": {"arch": "flux", "plan": FLUX_PLAN, "width": 3072, "heads": 24, "tokens_side": 64,
             "context_tokens": 512, "batch": 1, "dtype": "bfloat16"},
    "dit-b8": {"arch": "dit", "plan": DIT_PLAN, "width": 1152, "heads": 16, "tokens_side": 32,
               "context_tokens": 0, "batch": 8, "dtype": "float16"},
    "dit-b32": {"arch": "dit", "plan": DIT_PLAN, "width": 1152, "heads": 16, "tokens_side": 32,
                "context_tokens": 0, "batch": 32, "dtype": "float16"},
}  # fmt: skip
TINY = {"width": 64, "heads": 4, "tokens_side": 8, "context_tokens": 16, "dtype": "float32"}
MODES = ("untouched", "all_compute", "plan")


def compile_regions(transformer, arch: str) -> None:
    """Regional compile: each block's forward and each reusable module's forward separately."""
    modules = {id(getattr(block, kind.attribute)): getattr(block, kind.attribute)
               for kind in MODULE_KINDS[arch] for block in getattr(transformer, kind.layers)}  # fmt: skip
    if arch == "flux":  # the single-block MLP is act_mlp(proj_mlp(x)): both hooked
        modules.update({id(b.act_mlp): b.act_mlp for b in transformer.single_transformer_blocks})
    blocks = [b for name in layer_lists(arch) for b in getattr(transformer, name)]
    for module in [*modules.values(), *blocks]:
        module.forward = torch.compile(module.forward)


@contextlib.contextmanager
def hooks_break_graphs():
    """Make the runtime's module hooks graph breaks while compiled code runs."""
    original = _ModuleHook.new_forward
    _ModuleHook.new_forward = torch.compiler.disable(original)
    try:
        yield
    finally:
        _ModuleHook.new_forward = original


def graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run_case(name: str, args) -> dict[str, Any]:
    spec = dict(CASES[name], **(TINY if args.tiny else {}))
    spec["plan"] = PLANS / spec["plan"]
    settings = SimpleNamespace(**spec, device=args.device)
    eager_pipe, inputs, plan = build(settings)
    plan = replace(plan, target=replace(plan.target, dtype=spec["dtype"]))
    plans = {"all_compute": all_compute_plan(plan.arch, plan.steps, plan.layer_counts(), target=plan.target,
                                             geometry=plan.geometry), "plan": plan}  # fmt: skip
    pipes = {"eager": eager_pipe}
    if args.compile:
        compiled_model, _, _ = build(settings)
        compiled_model.transformer.load_state_dict(eager_pipe.transformer.state_dict())
        compile_regions(compiled_model.transformer, plan.arch)
        pipes["compiled"] = compiled_model
    device = torch.device(args.device)

    def generate(kind: str, mode: str) -> torch.Tensor:
        pipe = pipes[kind]
        guard = hooks_break_graphs() if kind == "compiled" else contextlib.nullcontext()
        context = cached(pipe, plans[mode], allow_mismatch=REUSE) if mode in plans else contextlib.nullcontext()
        with guard, context:
            return sample(pipe, inputs, plan.steps)

    runs = [(kind, mode) for kind in pipes for mode in MODES]
    outputs = {run: generate(*run) for run in runs}  # warm-up (and compilation)
    graphs_after_warmup = graph_count()
    seconds: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    peaks: dict[tuple[str, str], int] = {}
    for r in range(args.repeats):
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds[run].append(timed(lambda run=run: generate(*run), device))
            if device.type == "cuda":
                peaks[run] = torch.cuda.max_memory_allocated()
    result = {"case": name, **{k: v for k, v in spec.items() if k != "plan"}, "plan": Path(spec["plan"]).name,
              "steps": plan.steps, "ideal_speedup": plan.summary().ideal_speedup}  # fmt: skip
    for kind in pipes:
        median = {mode: statistics.median(seconds[(kind, mode)]) for mode in MODES}
        speedup = median["untouched"] / median["plan"]
        result[kind] = {
            "median_s": {mode: round(v, 4) for mode, v in median.items()},
            "hook_overhead_pct": round(100 * (median["all_compute"] / median["untouched"] - 1), 2),
            "speedup": round(speedup, 3),
            "speedup_over_ideal": round(speedup / plan.summary().ideal_speedup, 3),
        }
    eager = outputs[("eager", "untouched")]
    result["eager"]["all_compute_bit_identical"] = bool(
        torch.equal(outputs[("eager", "all_compute")], eager)
    )
    if args.compile:
        own = _max_diff(outputs[("compiled", "untouched")], eager)
        hooked = _max_diff(outputs[("compiled", "all_compute")], eager)
        result["compiled"].update({
            "untouched_vs_eager_max_abs": own,
            "all_compute_vs_eager_max_abs": hooked,
            "all_compute_within_compile_tolerance": hooked <= max(2 * own, _eps(eager.dtype)),
            "graphs_after_warmup": graphs_after_warmup,
            "graphs_added_while_timed": graph_count() - graphs_after_warmup,
        })  # fmt: skip
    if peaks:
        rows = spec["batch"]
        result["memory"] = {
            "predicted_peak_cache_bytes": plan.summary(batch=rows).peak_cache_bytes,
            "predicted_within_steps_bytes": plan.peak_cache_bytes_within_steps(batch=rows),
            **{f"{kind}_peak_increase_bytes": peaks[(kind, "plan")] - peaks[(kind, "untouched")] for kind in pipes},
        }  # fmt: skip
    return result


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _eps(dtype: torch.dtype) -> float:
    return 8 * torch.finfo(dtype).eps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--tiny", action="store_true", help="tiny width on the CPU (checks the script)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny to check the script on the CPU")
    if args.tiny:
        for case in CASES.values():
            case["batch"] = min(case["batch"], 2)
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    result = {
        "device": device,
        "torch": torch.__version__,
        "cases": [run_case(c, args) for c in args.cases],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
