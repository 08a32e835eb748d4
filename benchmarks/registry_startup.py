"""Start-up cost of ``invardiff-registry``: ``--help`` and a cached ``fetch`` vs bare Python.

Builds a throw-away registry (SQLite + local store under a temporary INVARDIFF_HOME),
publishes one reference FLUX plan, warms the cache with one fetch, then times, interleaved
and several times each, fresh processes of:

- ``python -c pass`` (the floor: interpreter start-up),
- ``python -m registry --help``,
- ``python -m registry fetch flux-dev 1024`` (a cache hit: no database, no store),
- the same two through the installed ``invardiff-registry`` console script, if present.

Run: ``python benchmarks/registry_startup.py [--runs 15]``. Target: cached fetch < 0.5 s wall.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "reference" / "official-plans"
TARGET_S = 0.5


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per command (default 15)")
    runs = parser.parse_args().runs
    python = sys.executable
    with tempfile.TemporaryDirectory() as home:
        env = {
            **os.environ,
            "INVARDIFF_HOME": home,
            "INVARDIFF_CACHE_DIR": str(Path(home) / "cache"),
            "PYTHONPATH": str(ROOT),
        }
        for name in ("INVARDIFF_DATABASE_URL", "INVARDIFF_STORE_URL"):
            env.pop(name, None)
        plan = min(PLAN.glob("flux_*.json"))
        registry = [python, "-m", "registry"]
        for setup in (
            ["init"],
            [
                "models",
                "add",
                "flux-dev",
                "hf://black-forest-labs/FLUX.1-dev",
                "--revision",
                "0123abc",
            ],
            ["publish", str(plan), "--model", "flux-dev", "--resolution", "1024"],
            ["fetch", "flux-dev", "1024"],
        ):
            subprocess.run(registry + setup, env=env, check=True, capture_output=True)
        commands = {
            "python -c pass": [python, "-c", "pass"],
            "--help": [*registry, "--help"],
            "cached fetch": [*registry, "fetch", "flux-dev", "1024"],
        }
        script = Path(python).parent / "invardiff-registry"  # the installed console script
        if script.exists():
            commands["script --help"] = [str(script), "--help"]
            commands["script fetch"] = [str(script), "fetch", "flux-dev", "1024"]
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, command in commands.items():
                samples[name].append(timed(command, env))
    floor = statistics.median(samples["python -c pass"])
    print(
        f"{'command':<15} {'median s':>9} {'min s':>7} {'max s':>7} {'x bare':>7}  ({runs} runs, {python})"
    )
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"{name:<15} {median:>9.3f} {min(values):>7.3f} {max(values):>7.3f} {median / floor:>7.1f}"
        )
    fetch = statistics.median(samples["cached fetch"])
    verdict = "meets" if fetch < TARGET_S else "MISSES"
    print(f"cached fetch median {fetch:.3f} s {verdict} the {TARGET_S} s target")


if __name__ == "__main__":
    main()
