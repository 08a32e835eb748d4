"""Helpers of the fleet tests: registries, driver subprocesses, reading their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Ray 2.60 turns token authentication on for local clusters: set it explicitly everywhere.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def open_registry(home: Path, create: bool = False):
    from registry.config import Config
    from registry.service import Registry

    config = Config.from_env(env={"INVARDIFF_HOME": str(home)})
    return Registry.open(config, create=create, check_schema=not create)


def cli_process(home: Path, *args: str, lease: float = 30.0) -> subprocess.Popen:
    """``invardiff-registry ARGS`` as a separate driver process on this checkout."""
    env = {
        **os.environ,
        **RAY_ENV,
        "INVARDIFF_HOME": str(home),
        "INVARDIFF_JOB_LEASE_S": str(lease),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "registry", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 240) -> list[str]:
    """Read the process's stderr until a line contains ``needle``; return the lines read."""
    import selectors
    import time

    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if needle in line:
                return lines
    raise AssertionError(f"no {needle!r} on stderr; got: {''.join(lines)[-2000:]}")


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, dict | None, str]:
    """Exit code, parsed JSON stdout (if any) and the rest of stderr."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, json.loads(out) if out.strip() else None, err


def in_process_plan_bytes(request) -> bytes:
    """The plan bytes of a digits-flux ``request`` calibrated in this process, without Ray."""
    from dataclasses import replace

    import torch

    from invardiff import calibrate
    from invardiff.models import load_builtin

    torch.set_num_threads(1)  # as in the actors; more threads than free cores crawl here
    pipe = load_builtin("digits-flux")
    pipe.set_progress_bar_config(disable=True)
    plan = calibrate(pipe, request.calls, "fast", model_id=request.source)
    target = replace(plan.target, height=16, width=16)
    calibration = {**plan.calibration, "job_key": request.job_key, "prompts_sha256": None}
    return replace(plan, target=target, calibration=calibration).to_bytes()
