"""Calibration fleet benchmark: throughput, recording overhead, simulated scaling.

    python benchmarks/fleet.py [--model digits-flux] [--trajectories 16] [--repeats 5] [--json]

1. **Throughput** with 1 and 2 Ray workers on a local Ray: the same request calibrated into
   a fresh embedded registry each time (validation off); trajectories per second over the
   shard phases, model-load time per worker, the barrier between the phases, build time.
2. **Recording overhead**: one calibration trajectory (phase 1, phase 2) against a plain
   sampling call of the same call, interleaved in this process (median of ``--repeats``).
3. **Simulated scaling** to 8, 32 and 64 workers, driven by the measured per-shard times,
   model-load time, barrier and build times: greedy dispatch of shards to the first free
   worker, two phases with a barrier. Efficiency = T(1) / (k T(k)); ``per_added_worker``
   is the speed-up gained per added worker (ideal 1.0).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def calibrate_once(model: str, trajectories: int, workers: int) -> dict:
    """One fleet calibration into a fresh embedded registry; timings and per-shard seconds."""
    from registry.config import Config
    from registry.service import Registry
    from workers.driver import RunOptions, submit
    from workers.request import build_request

    with tempfile.TemporaryDirectory() as home:
        config = Config.from_env(env={"INVARDIFF_HOME": home})
        registry = Registry.open(config, create=True, check_schema=False)
        registry.init()
        request = build_request(registry.model(model), trajectories=trajectories, validate=0)
        shards: dict[int, list[float]] = {1: [], 2: []}

        def on_shard(phase: int, result: dict) -> None:
            shards[phase].append(result["seconds"])

        started = time.perf_counter()
        result = submit(registry, request, RunOptions(workers=workers, on_shard=on_shard))
        wall = time.perf_counter() - started
    phases = result.phases
    shard_s = phases["phase-1"]["seconds"] + phases["phase-2"]["seconds"]
    return {
        "workers": workers,
        "trajectories": trajectories,
        "wall_s": round(wall, 2),
        "load_s": [w["load_s"] for w in result.workers],
        "phase1_s": phases["phase-1"]["seconds"],
        "phase2_s": phases["phase-2"]["seconds"],
        "barrier_s": phases["barrier_s"],
        "build_s": phases["build_s"],
        "shard_s": {str(p): [round(s, 4) for s in v] for p, v in shards.items()},
        "phase2_trajectories_per_s": round(trajectories / phases["phase-2"]["seconds"], 3),
        "trajectories_per_s": round(2 * trajectories / shard_s, 3),
        "sha256": result.sha256,
    }


def recording_overhead(model: str, repeats: int) -> dict:
    """Median seconds of a plain sampling call vs a phase-1 and a phase-2 trajectory."""
    import torch

    from invardiff.calibration import (
        CalibrationParams,
        merge_scores,
        pipeline_runner,
        provisional_flags,
        trajectory_stats,
    )
    from invardiff.cli import calibration_calls
    from invardiff.models import load_builtin

    torch.set_num_threads(1)  # as in a one-CPU actor
    pipe = load_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    run = pipeline_runner(pipe)
    call = calibration_calls(model, 1)[0]
    steps = call["num_inference_steps"]
    arch = "flux" if "flux" in model else "dit"
    params = CalibrationParams.resolve(arch)
    first = trajectory_stats(pipe.transformer, run, call, 0, steps, params)
    flags = provisional_flags(merge_scores([first]), params)
    plain, phase1, phase2 = [], [], []
    for _ in range(repeats):  # interleaved
        t0 = time.perf_counter()
        run(call, torch.Generator().manual_seed(call["seed"]))
        t1 = time.perf_counter()
        trajectory_stats(pipe.transformer, run, call, 0, steps, params)
        t2 = time.perf_counter()
        trajectory_stats(pipe.transformer, run, call, 0, steps, params, provisional=flags)
        t3 = time.perf_counter()
        plain.append(t1 - t0)
        phase1.append(t2 - t1)
        phase2.append(t3 - t2)
    base = statistics.median(plain)
    return {
        "plain_s": round(base, 4),
        "phase1_s": round(statistics.median(phase1), 4),
        "phase2_s": round(statistics.median(phase2), 4),
        "phase1_overhead": round(statistics.median(phase1) / base - 1, 3),
        "phase2_overhead": round(statistics.median(phase2) / base - 1, 3),
    }


def simulate(workers: int, trajectories: int, shard_s: list[float], load_s: float,
             barrier_s: float, build_s: float) -> float:  # fmt: skip
    """Seconds of a two-phase job on ``workers`` actors: greedy dispatch, barrier between."""
    clock = load_s  # every actor loads in parallel

    def phase(start: float) -> float:
        free = [start] * min(workers, trajectories)
        heapq.heapify(free)
        for i in range(trajectories):
            heapq.heappush(free, heapq.heappop(free) + shard_s[i % len(shard_s)])
        return max(free)

    clock = phase(clock) + barrier_s
    return phase(clock) + build_s


def scaling(trajectories: int, measured: dict, counts=(1, 2, 8, 32, 64)) -> dict[str, list[dict]]:
    """Simulated job seconds per worker count, with the measured shard times and, to separate
    this machine's noise from scheduling, with every shard at the measured median."""
    # Driver round trip per shard: phase 2 on one worker minus the time spent in its shards.
    dispatch = max(0.0, measured["phase2_s"] - sum(measured["shard_s"]["2"])) / trajectories_of(
        measured
    )
    shards = [s + dispatch for s in measured["shard_s"]["1"] + measured["shard_s"]["2"]]
    fixed = (statistics.mean(measured["load_s"]), measured["barrier_s"], measured["build_s"])
    variants = {"measured": shards, "constant": [statistics.median(shards)]}
    print(f"dispatch overhead per shard: {dispatch * 1000:.1f} ms", file=sys.stderr)
    return {name: _rows(trajectories, times, fixed, counts) for name, times in variants.items()}


def trajectories_of(measured: dict) -> int:
    return len(measured["shard_s"]["2"])


def _rows(trajectories: int, shard_s: list[float], fixed: tuple, counts) -> list[dict]:
    """``efficiency`` counts the fixed costs (model load, barrier, build); ``shard_efficiency``
    and ``per_added_worker`` (speed-up gained per added worker, ideal 1.0) the shard phases."""
    one, one_shards = (
        simulate(1, trajectories, shard_s, *fixed),
        simulate(1, trajectories, shard_s, 0, 0, 0),
    )
    rows, previous = [], None
    for k in counts:
        total, phases = (
            simulate(k, trajectories, shard_s, *fixed),
            simulate(k, trajectories, shard_s, 0, 0, 0),
        )
        row = {"workers": k, "seconds": round(total, 2), "efficiency": round(one / (k * total), 3),
               "shard_efficiency": round(one_shards / (k * phases), 3)}  # fmt: skip
        if previous is not None:
            gained = one_shards / phases - one_shards / previous[1]
            row["per_added_worker"] = round(gained / (k - previous[0]), 3)
        rows.append(row)
        previous = (k, phases)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-flux", choices=["digits-flux", "digits-dit"])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--simulate-trajectories", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        runs = [calibrate_once(args.model, args.trajectories, k) for k in (1, 2)]
    finally:
        ray.shutdown()
    assert runs[0]["sha256"] == runs[1]["sha256"], "plan bytes differ between 1 and 2 workers"
    report = {
        "model": args.model,
        "throughput": runs,
        "throughput_ratio_2_vs_1": round(
            runs[1]["trajectories_per_s"] / runs[0]["trajectories_per_s"], 3
        ),
        "recording": recording_overhead(args.model, args.repeats),
        "simulation": {str(n): scaling(n, runs[0]) for n in args.simulate_trajectories},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for run in runs:
        print(f"{run['workers']} worker(s): {run['trajectories_per_s']} trajectories/s over the shard phases, "
              f"load {run['load_s']} s, barrier {run['barrier_s']} s, build {run['build_s']} s, wall {run['wall_s']} s")  # fmt: skip
    print(f"2 vs 1 workers: {report['throughput_ratio_2_vs_1']}x")
    rec = report["recording"]
    print(
        f"plain call {rec['plain_s']} s; phase 1 +{rec['phase1_overhead']:.1%}, phase 2 +{rec['phase2_overhead']:.1%}"
    )
    for n, variants in report["simulation"].items():
        for name, rows in variants.items():
            print(f"simulated, {n} trajectories, {name} shard times:")
            for row in rows:
                print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
