"""InvarDiff plans against the caching methods users would pick instead, on the built-in models.

    python -m benchmarks.peers                                  # both models, all families
    python -m benchmarks.peers --samples 20 --batch 10 --repeats 2 --models digits-flux   # quick

For each model (digits-dit DDIM-50, digits-flux Euler-28; same labels, seeds and guidance) every
method gets its own pipeline. One untimed pass per method generates ``--samples`` images (labels
0-9 in turn, batches of ``--batch``, seeds 0, 1, ...) under torch's FLOP counter: it is the
warm-up and gives PSNR/SSIM against full compute, digit accuracy, Frechet distance and the
FLOP-weighted fraction of block work executed. Then ``--repeats`` rounds time the first batch
once per method, interleaved (the order rotates each round); the speed-up is the median over
rounds of full compute's time over the method's time in the same round, in wall-clock time and
in process CPU time (less sensitive to other load on a shared machine; use ``--threads 1``).

Writes ``<out>/peers.json`` and ``<out>/peers.md`` and a speed/fidelity scatter with the Pareto
front per model (``<img-dir>/peers-<model>.png``). Timings on a shared machine are noisy; PSNR,
SSIM and FLOP fractions are not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import peer_methods as pm
from invardiff import metrics
from invardiff.cli import builtin_settings, calibration_calls
from invardiff.models import BUILTIN_MODELS, load_builtin
from invardiff.models.digits import sample
from invardiff.schedules import every_k_plan

# InvarDiff points: both presets and points between/around them (the reference rules), then
# budget points over the range the peers cover (TARGET_SPEEDUPS).
INVARDIFF_SWEEP: dict[str, list[dict[str, Any]]] = {
    "dit": [
        {"preset": "fast"}, {"preset": "slow"},
        {"preset": "fast", "q_step": 0.5}, {"preset": "fast", "q_step": 0.7},
        {"preset": "fast", "q_attn": 0.1, "q_mlp": 0.1},
        {"preset": "fast", "max_consecutive": 1}, {"preset": "fast", "max_consecutive": 2},
    ],
    "flux": [
        {"preset": "fast"}, {"preset": "slow"},
        {"preset": "fast", "q_step": 0.6}, {"preset": "fast", "q_step": 0.8},
        {"preset": "fast", "q_attn": 0.5, "q_ff": 0.5, "q_context_ff": 0.5, "q_single_attn": 0.5, "q_single_mlp": 0.5},
        {"preset": "fast", "max_consecutive": 1}, {"preset": "fast", "max_consecutive": 2},
    ],
}  # fmt: skip
TARGET_SPEEDUPS = (1.05, 1.1, 1.3, 1.5, 2.0, 2.5, 3.0, 3.23, 3.25, 3.5, 4.0, 5.0)
# 1.05: FirstBlockCache 0.05 on flux (1.032x); 1.3: FasterCache 2/2 (1.292x) and 3.23: TaylorSeer interval 4 (3.226x) on dit

FAMILIES = (
    "full",
    "invardiff",
    "every-k",
    "fbc",
    "taylorseer",
    "magcache",
    "pab",
    "fastercache",
    "cache-dit",
)
INVARDIFF = "InvarDiff"
NOISE = 0.05  # relative timing noise allowed when asking "as fast, within noise"
# speed-up axes: wall clock, process CPU time (less sensitive to other load), FLOPs (exact)
AXES = {"speedup": "wall clock", "cpu_speedup": "CPU time", "flop_speedup": "FLOPs"}
BLOCK_KEY = re.compile(r"\.(single_)?transformer_blocks\.\d+$")
TIMING_NOTE = ("wall-clock on a {cores}-core CPU machine, load average {load_before:.2f} before and "
               "{load_after:.2f} after the run (the run itself adds about its thread count): speed-ups "
               "are medians of interleaved rounds; PSNR, SSIM and FLOP fractions are exact")  # fmt: skip


def methods(arch: str, families: set[str], every_k: list[int], targets: tuple[float, ...] = TARGET_SPEEDUPS,
            reference_rules: bool = True) -> list[pm.Method]:
    """Every method of the benchmark for one architecture, in table order (InvarDiff: the
    reference-rule sweep unless ``reference_rules`` is false, then a budget plan per target)."""
    chosen: list[pm.Method] = []
    if "full" in families:
        chosen.append(pm.full_compute())
    if "invardiff" in families:
        chosen.append(pm.plan_method(INVARDIFF, "all-compute plan (hook overhead)", lambda t: t))
        for params in INVARDIFF_SWEEP[arch] * reference_rules + [{"target_speedup": s} for s in targets]:
            chosen.append(pm.invardiff_plan(_setting(params), **params))
    if "every-k" in families:
        chosen += [
            pm.plan_method("every-k", f"k={k}", lambda t, k=k: every_k_plan(t, k))
            for k in every_k
        ]
    if "fbc" in families:
        chosen += [pm.first_block_cache(t) for t in (0.05, 0.1, 0.2, 0.3)]
    if "taylorseer" in families:
        chosen += [pm.taylorseer(n) for n in (2, 3, 4)] + [pm.taylorseer(3, order=2)]
    if "magcache" in families:
        chosen += [pm.mag_cache(t) for t in (0.06, 0.12, 0.24)]
    if "pab" in families:
        chosen += [pm.pyramid_attention_broadcast(n) for n in (2, 3, 4)] + [
            pm.pyramid_attention_broadcast(2, (-1, 1001))
        ]
    if "fastercache" in families:
        chosen += [pm.faster_cache(2, 5), pm.faster_cache(2, 2), pm.faster_cache(3, 3)]
    if "cache-dit" in families:
        chosen += [pm.cache_dit(f"F1B0, threshold {t:g}", Fn_compute_blocks=1, Bn_compute_blocks=0,
                                residual_diff_threshold=t) for t in (0.08, 0.12, 0.2, 0.3)]  # fmt: skip
        chosen.append(pm.cache_dit("F1B0, threshold 0.2, TaylorSeer order 1", taylorseer_order=1,
                                   Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2))  # fmt: skip
    return chosen


def _setting(params: dict[str, Any]) -> str:
    if "target_speedup" in params:
        return f"target {params['target_speedup']:g}x"
    rest = " ".join(f"{k}={v}" for k, v in params.items() if k != "preset")
    return (params.get("preset", "") + " " + rest).strip()


@dataclass
class Entry:
    """One method on one model: its pipeline while running, then its figures."""

    method: pm.Method
    pipe: Any = None
    plan: Any = None
    reason: str | None = None
    images: np.ndarray | None = None
    block_flops: float = 0.0
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)


def generate(entry: Entry, labels: list[int], setup: pm.ModelSetup, batch: int) -> np.ndarray:
    return sample(entry.pipe, labels, setup.guidance, setup.steps, seed=0, batch_size=batch)


def count_block_flops(entry: Entry, labels, setup, batch) -> tuple[np.ndarray, float]:
    """Images, and the FLOPs executed inside the transformer blocks, of one pass."""
    with FlopCounterMode(display=False, depth=None) as counter:
        images = generate(entry, labels, setup, batch)
    flops = sum(
        sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if BLOCK_KEY.search(name)
    )
    return images, float(flops)


def run_model(name: str, args, say) -> dict[str, Any]:
    steps, guidance = builtin_settings(name)
    arch = str(BUILTIN_MODELS[name]["architecture"])
    setup = pm.ModelSetup(name, arch, steps, guidance, calibration_calls(name, args.trajectories))
    labels = [i % 10 for i in range(args.samples)]
    time_labels = labels[: args.batch]

    reference = Entry(pm.full_compute(), pipe=load_builtin(name))
    reference.images, reference.block_flops = count_block_flops(
        reference, labels, setup, args.batch
    )
    entries = []
    for method in methods(arch, set(args.families), args.every_k, tuple(args.targets), not args.no_reference_rules):
        entry = Entry(method)
        entries.append(entry)
        say(f"{name}: {method.family} {method.setting}")
        try:
            entry.pipe = load_builtin(name)
            entry.pipe.set_progress_bar_config(disable=True)
            entry.plan = method.install(entry.pipe, setup)
            entry.images, entry.block_flops = count_block_flops(entry, labels, setup, args.batch)
        except pm.Unsupported as exc:
            entry.reason, entry.pipe = str(exc), None
    order = [reference] + [e for e in entries if e.pipe is not None]
    generate(reference, time_labels, setup, args.batch)  # its quality pass was long ago
    for r in range(args.repeats):
        say(f"{name}: timing round {r + 1}/{args.repeats}")
        shift = r % len(order)
        for entry in order[shift:] + order[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            generate(entry, time_labels, setup, args.batch)
            entry.seconds.append(time.perf_counter() - wall)
            entry.cpu_seconds.append(time.process_time() - cpu)
    rows = [_row(e, reference, labels) for e in entries]
    _mark_fronts(rows)
    return {
        "steps": steps,
        "guidance": guidance,
        "full_compute_s": [round(s, 4) for s in reference.seconds],
        "full_compute_cpu_s": [round(s, 4) for s in reference.cpu_seconds],
        "full_compute_block_gflops": round(reference.block_flops / 1e9, 3),
        "methods": rows,
    }


def _median_ratio(baseline: list[float], seconds: list[float]) -> float:
    return round(statistics.median(b / s for b, s in zip(baseline, seconds)), 3)


def _row(entry: Entry, reference: Entry, labels: list[int]) -> dict[str, Any]:
    method = entry.method
    row: dict[str, Any] = {"family": method.family, "setting": method.setting}
    if entry.reason is not None:
        return {**row, "status": "unsupported", "reason": entry.reason}
    fraction = entry.block_flops / reference.block_flops
    identical = bool(np.array_equal(entry.images, reference.images))
    psnr = metrics.psnr(entry.images, reference.images)
    row.update({
        "status": "ok",
        "speedup": _median_ratio(reference.seconds, entry.seconds),
        "cpu_speedup": _median_ratio(reference.cpu_seconds, entry.cpu_seconds),
        "seconds": [round(s, 4) for s in entry.seconds],
        "cpu_seconds": [round(s, 4) for s in entry.cpu_seconds],
        "flop_fraction": round(fraction, 6),
        "flop_speedup": round(1 / fraction, 4) if fraction else None,
        "identical": identical,
        "psnr_db": None if identical or math.isinf(psnr) else round(psnr, 3),
        "ssim": round(metrics.ssim(entry.images, reference.images), 5),
        "accuracy": round(metrics.accuracy(entry.images, labels), 4),
        "frechet": round(metrics.frechet_distance(entry.images), 3),
    })  # fmt: skip
    if entry.plan is not None:
        summary = entry.plan.summary()
        row["plan"] = {"executed_fraction": summary.executed_fraction, "ideal_speedup": summary.ideal_speedup,
                       "step_gate": "".join("R" if g else "." for g in entry.plan.step_gate)}  # fmt: skip
    return row


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """True for each (speed, fidelity) point no other point beats on both (and ties on neither)."""
    return [
        not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points) for x, y in points
    ]


def _fidelity(row: dict[str, Any]) -> float:
    return math.inf if row["identical"] else row["psnr_db"]


def _mark_fronts(rows: list[dict[str, Any]]) -> None:
    """Pareto fronts (measured and FLOP speed-up vs PSNR) and, per peer point, the InvarDiff
    plan that dominates it (as fast within ``NOISE`` resp. exactly, and at least as faithful)."""
    ok = [r for r in rows if r["status"] == "ok"]
    for axis in AXES:
        for row, front in zip(ok, pareto([(r[axis], _fidelity(r)) for r in ok])):
            row[f"pareto_{axis}"] = front
    ours = [r for r in ok if r["family"] == INVARDIFF]
    for row in ok:
        if row["family"] in (INVARDIFF, "full compute"):
            continue
        for axis in AXES:
            tol = 0.0 if axis == "flop_speedup" else NOISE
            better = [
                o
                for o in ours
                if o[axis] >= row[axis] * (1 - tol) and _fidelity(o) >= _fidelity(row)
            ]
            row[f"dominated_by_{axis}"] = (
                max(better, key=lambda o: o[axis])["setting"] if better else None
            )


# ---- outputs ----------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    lines = [f"_{result['meta']['timing_note']}._", ""]
    for name, model in result["models"].items():
        lines += [f"### {name} ({model['steps']} steps, guidance {model['guidance']})", "",
                  ("| method | setting | speed-up wall / CPU | FLOP fraction (speed-up) | PSNR | SSIM | accuracy | FD "
                   "| on the front | beaten by InvarDiff (as fast and as faithful) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in model["methods"]:
            if r["status"] != "ok":
                lines.append(f"| {r['family']} | {r['setting']} | not run: {r['reason']} ||||||||")
                continue
            psnr = "identical" if r["identical"] else f"{r['psnr_db']:.1f} dB"
            front = "/".join(label for axis, label in AXES.items() if r.get(f"pareto_{axis}"))
            beaten = ""
            if "dominated_by_flop_speedup" in r:
                beaten = "; ".join(
                    f"{label}: {r[f'dominated_by_{axis}'] or '**no**'}"
                    for axis, label in AXES.items()
                )
            lines.append(f"| {r['family']} | {r['setting']} | {r['speedup']:.2f}x / {r['cpu_speedup']:.2f}x | {r['flop_fraction']:.3f} "
                         f"({r['flop_speedup']:.2f}x) | {psnr} | {r['ssim']:.4f} | {r['accuracy']:.2f} | {r['frechet']:.1f} "
                         f"| {front} | {beaten} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _series(row: dict[str, Any]) -> str:
    """The scatter's series: the family, InvarDiff split into budget plans and reference rules."""
    if row["family"] != INVARDIFF:
        return row["family"]
    return f"{INVARDIFF} budget" if row["setting"].startswith("target") else f"{INVARDIFF} reference rules"


def plot(name: str, model: dict[str, Any], path: Path) -> None:
    """One panel per speed-up axis (wall clock, CPU time, FLOPs) against PSNR, one marker per
    family, with the Pareto front of each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in model["methods"] if r["status"] == "ok" and not r["identical"]]
    families = list(dict.fromkeys(_series(r) for r in rows))
    markers = "o^sDvP*Xh<>"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.4), sharey=True)
    labels = (
        "speed-up, wall clock (noisy)",
        "speed-up, process CPU time",
        "FLOP speed-up (1 / block-FLOP fraction)",
    )
    for ax, axis, label in zip(axes, AXES, labels):
        for i, family in enumerate(families):
            pts = [(r[axis], r["psnr_db"]) for r in rows if _series(r) == family]
            ax.scatter(*zip(*pts), marker=markers[i % len(markers)], s=60 if family.startswith(INVARDIFF) else 36,
                       label=family, zorder=3)  # fmt: skip
        front = sorted((r[axis], r["psnr_db"]) for r in rows if r.get(f"pareto_{axis}"))
        if front:
            ax.plot(*zip(*front), color="black", lw=1, ls="--", label="Pareto front", zorder=2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs full compute (dB)")
    axes[2].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{name}: speed vs fidelity (same labels, seeds, guidance)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def meta(args) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import diffusers

    try:
        cache_dit = version("cache-dit")
    except PackageNotFoundError:
        cache_dit = None
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cache_dit": cache_dit,
        "samples": args.samples, "batch": args.batch, "repeats": args.repeats,
        "trajectories": args.trajectories, "load_before": os.getloadavg()[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(BUILTIN_MODELS), default=list(BUILTIN_MODELS)
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--samples", type=int, default=40, help="images per method for the quality figures"
    )
    parser.add_argument(
        "--batch", type=int, default=20, help="images per pipeline call (the timed call)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--trajectories", type=int, default=8, help="calibration calls (InvarDiff, MagCache)"
    )
    parser.add_argument("--every-k", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--targets", type=float, nargs="*", default=list(TARGET_SPEEDUPS),
                        help="InvarDiff budget targets (target_speedup; default: the sweep's)")
    parser.add_argument("--no-reference-rules", action="store_true",
                        help="InvarDiff: budget plans only, not the reference-rule sweep")
    parser.add_argument("--out", type=Path, default=Path("out/peers"))
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.batch < 1 or args.repeats < 1 or args.trajectories < 1:
        parser.error("--samples must be >= 2 and --batch, --repeats, --trajectories >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = min(args.batch, args.samples)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = {"meta": meta(args), "models": {}}
    for name in args.models:
        result["models"][name] = run_model(name, args, say)
    info = result["meta"]
    info["load_after"] = os.getloadavg()[0]
    info["timing_note"] = TIMING_NOTE.format(cores=os.cpu_count(), **info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (args.out / "peers.md").write_text(markdown(result) + "\n")
    for name, model in result["models"].items():
        plot(name, model, args.img_dir / f"peers-{name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
