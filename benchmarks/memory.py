"""Memory of a cached generation against full compute, and the plan's predicted peak cache bytes.

    python -m benchmarks.memory [--models digits-dit digits-flux] [--batch 16] [--trajectories 8]

For each built-in model and plan (the fast and slow presets, calibrated here, and every 3rd
step), one generation of ``--batch`` images (classifier-free guidance doubles the rows the
transformer sees) runs with full compute, under an all-compute plan (the hooks, nothing cached)
and under the plan, and is compared with ``plan.summary(batch=rows).peak_cache_bytes``:

- ``held``: after each transformer call, the bytes of the distinct tensor storages the
  runtime's caches hold; the maximum over steps. Deterministic: must equal the prediction.
  ``held within steps``: the same after every module call, against
  ``plan.peak_cache_bytes_within_steps(rows)`` (inside a step new outputs of early layers sit
  beside old ones of later layers).
- ``floor``: glibc's in-use heap bytes (``mallinfo2``: every CPU tensor is a malloc) after each
  transformer call, the plan minus the all-compute plan at the same step; the maximum over
  steps. Must be within 10 % of the prediction.
- ``peak increase``: the same in-use bytes sampled after every module call over the whole
  generation, the plan's peak minus full compute's. Must stay within 10 % above the
  within-steps prediction (it is lower when the activation peak and the cache peak fall apart).

Linux (glibc >= 2.33) for the allocator figures; CPU only. Prints JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

import invardiff
from benchmarks import peer_methods as pm
from invardiff import CachePlan, all_compute_plan
from invardiff.cli import builtin_settings, calibration_calls
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.schedules import every_k_plan

TOLERANCE = 0.10


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def heap_in_use() -> Callable[[], int]:
    """A function returning glibc's bytes in use (heap chunks plus mmapped chunks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


def held_bytes(cache) -> int:
    """Bytes of the distinct storages a live :class:`invardiff.PlanCache` holds right now."""
    tensors = []
    for branch in cache._branches:  # the runtime's own cache contents
        for value in branch.modules.values():
            tensors += list(value) if isinstance(value, tuple) else [value]
        if branch.hidden is not None:
            tensors.append(branch.hidden)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def trace(
    pipe, labels: list[int], steps: int, guidance: float, cache=None, heap: bool = True
) -> dict[str, list[int]]:
    """One generation: after each transformer call and after every module call, the heap bytes
    in use (``heap``) and the bytes the runtime holds (with its ``cache``)."""
    in_use = heap_in_use() if heap else None
    record: dict[str, list[int]] = {"floor": [], "modules": [], "held": [], "held_modules": []}

    def sample(heap_key: str, held_key: str) -> None:
        if in_use is not None:
            record[heap_key].append(in_use())
        if cache is not None:
            record[held_key].append(held_bytes(cache))

    handles = [
        pipe.transformer.register_forward_hook(lambda *_: sample("floor", "held")),
        torch.nn.modules.module.register_module_forward_hook(
            lambda *_: sample("modules", "held_modules")
        ),
    ]
    try:
        pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return record


def compare(
    pipe, plan: CachePlan, labels: list[int], steps: int, guidance: float
) -> dict[str, Any]:
    """Full compute, an all-compute plan (hooks, nothing cached) and ``plan``, on one pipeline."""
    trace(pipe, labels, steps, guidance)  # warm-up: lazily created buffers, allocator pools
    full = trace(pipe, labels, steps, guidance)
    layers = plan.layer_counts()
    with invardiff.cached(
        pipe, all_compute_plan(plan.arch, plan.steps, layers, target=plan.target)
    ):
        hooked = trace(pipe, labels, steps, guidance)
    with invardiff.cached(pipe, plan) as cache:
        cached = trace(pipe, labels, steps, guidance, cache)
    rows = len(labels) * (2 if guidance > 1 else 1)
    predicted = plan.summary(batch=rows).peak_cache_bytes
    within_steps = plan.peak_cache_bytes_within_steps(batch=rows)
    held = max(cached["held"])
    floor = max(c - h for c, h in zip(cached["floor"], hooked["floor"]))
    peak = max(cached["modules"]) - max(full["modules"])
    return {
        "rows": rows,
        "ideal_speedup": plan.summary().ideal_speedup,
        "predicted_bytes": predicted,
        "predicted_within_steps_bytes": within_steps,
        "held_bytes": held,
        "held_within_steps_bytes": max(cached["held_modules"]),
        "floor_bytes": floor,
        "peak_increase_bytes": peak,
        "hook_bookkeeping_bytes": max(h - f for h, f in zip(hooked["floor"], full["floor"])),
        "full_peak_bytes": max(full["modules"]),
        "held_over_predicted": _ratio(held, predicted),
        "floor_over_predicted": _ratio(floor, predicted),
        "peak_increase_over_predicted_within_steps": _ratio(peak, within_steps),
        "within_10pct": bool(predicted and abs(floor / predicted - 1) <= TOLERANCE
                             and peak <= (1 + TOLERANCE) * within_steps),
    }  # fmt: skip


def _ratio(value: int, predicted: int) -> float | None:
    return round(value / predicted, 4) if predicted else None


def plans(name: str, pipe, trajectories: int) -> dict[str, CachePlan]:
    """The plans measured on a model: both presets (calibrated here) and every 3rd step."""
    steps, guidance = builtin_settings(name)
    arch = str(BUILTIN_MODELS[name]["architecture"])
    calls = calibration_calls(name, trajectories)
    setup = pm.ModelSetup(name, arch, steps, guidance, calls)
    chosen = {
        p: invardiff.calibrate(pipe, calls, preset=p, model_id=name) for p in ("fast", "slow")
    }
    chosen["every 3rd step"] = every_k_plan(pm.template_plan(pipe, setup), 3)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(BUILTIN_MODELS), default=list(BUILTIN_MODELS)
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--trajectories", type=int, default=8)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.trajectories < 1:
        parser.error("--batch and --trajectories must be >= 1")
    torch.set_num_threads(1)  # one thread: no per-thread allocator arenas or scratch buffers
    result: dict[str, Any] = {}
    for name in args.models:
        steps, guidance = builtin_settings(name)
        pipe = load_builtin(name)
        pipe.set_progress_bar_config(disable=True)
        labels = [i % 10 for i in range(args.batch)]
        result[name] = {
            label: compare(pipe, plan, labels, steps, guidance)
            for label, plan in plans(name, pipe, args.trajectories).items()
        }
    print(json.dumps(result, indent=2))
    return 0 if all(r["within_10pct"] for model in result.values() for r in model.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
