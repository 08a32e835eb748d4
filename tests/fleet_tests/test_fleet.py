"""The calibration fleet on a real local Ray with the built-in digits-flux model.

Every job here calibrates the same request (4 trajectories), whose plan bytes are computed
once in-process with ``invardiff.calibrate`` as the reference.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet_helpers import cli_process, finish, in_process_plan_bytes, open_registry, wait_for_line

from registry.cli import main
from registry.service import BUILTIN_MODELS
from registry.store import blob_key
from workers.driver import RunOptions, submit
from workers.errors import QUALITY_GATE
from workers.request import build_request

TRAJECTORIES = 4
BUDGET_STEPS = 14  # budget jobs: half the model's 28 steps halves each sample and the search
FLUX = next(m for m in BUILTIN_MODELS if m.name == "digits-flux")
CLI_ARGS = ["calibrate", "digits-flux", "16", "--trajectories", str(TRAJECTORIES), "--json"]


@pytest.fixture(scope="module")
def request_():
    return build_request(FLUX, trajectories=TRAJECTORIES, validate=0)


@pytest.fixture(scope="module")
def reference(request_) -> bytes:
    """The plan bytes of the request calibrated in this process, without Ray."""
    return in_process_plan_bytes(request_)


def _shards(registry, job_key: str, phase: int) -> int:
    return len(list(registry.store.list(f"jobs/{job_key}/phase-{phase}/")))


def test_bytes_identical_with_1_2_3_workers_any_order_and_a_killed_worker(
    ray_address, tmp_path, request_, reference
):
    for workers, shuffle, kill in [(1, None, True), (2, 7, False), (3, 3, False)]:
        registry = open_registry(tmp_path / f"home-{workers}", create=True)
        registry.init()
        killed: list[int] = []

        def on_shard(phase: int, result: dict, kill: bool = kill, killed: list = killed) -> None:
            if kill and phase == 1 and not killed:  # mid-phase: 3 shards still to go
                os.kill(result["pid"], signal.SIGKILL)
                killed.append(result["pid"])

        options = RunOptions(
            workers=workers, cpus_per_worker=0.5, shuffle=shuffle, on_shard=on_shard
        )
        result = submit(registry, request_, options)
        assert result.created and result.status == "succeeded" and len(result.workers) == workers
        assert registry.store.get(blob_key(result.sha256)) == reference, f"{workers} workers"
        assert result.phases["phase-1"]["computed"] == result.phases["phase-2"]["computed"] == 4
        if kill:  # the only worker died mid-phase: Ray restarted it and the job completed
            assert result.worker_restarts >= 1 and result.workers[0]["pid"] != killed[0]


def test_budget_search_fans_its_measurements_out_and_gives_the_in_process_bytes(
    ray_address, tmp_path, request_
):
    """A budget job: phase 1 on the workers, the search's held-out measurements (profile,
    candidates, certification) spread over them, progress per measured plan, the very plan
    ``invardiff.calibrate`` makes in one process, and its certified figures as version metrics."""
    import torch

    from invardiff import calibrate
    from invardiff.models import load_builtin

    budget = build_request(
        FLUX, steps=BUDGET_STEPS, trajectories=TRAJECTORIES, validate=0,
        budget={"target_speedup": 2.8},
    )
    torch.set_num_threads(1)
    pipe = load_builtin("digits-flux")
    pipe.set_progress_bar_config(disable=True)
    plan = calibrate(pipe, budget.calls, target_speedup=2.8, model_id=FLUX.source)
    calibration = {**plan.calibration, "job_key": budget.job_key, "prompts_sha256": None}
    expected = replace(
        plan, target=replace(plan.target, height=16, width=16), calibration=calibration
    )
    record = plan.calibration
    inner = BUDGET_STEPS - 2  # the step profile: each inner step reused alone
    assert len(record["step_psnr"]) == inner and record["mode"] == "budget"
    assert record["certified"]["samples"] == TRAJECTORIES  # one digit per certification call
    jumps = record.get("lemica_jumps_measured", 0)  # LeMiCa's edges (invardiff/paths.py)
    assert record["measured"] == {"profile": inner, "jumps": jumps, "candidates": len(record["candidates_psnr"]),
                                  "certification": 1}  # fmt: skip
    for workers in (1, 2):
        registry = open_registry(tmp_path / f"home-{workers}", create=True)
        registry.init()
        lines: list[str] = []
        options = RunOptions(workers=workers, cpus_per_worker=0.5, progress=lines.append)
        result = submit(registry, budget, options)
        assert result.created and "phase-2" not in result.phases
        measured = result.phases["measure"]
        assert measured["plans"] == sum(record["measured"].values())
        assert measured["workers"] == workers  # every worker measured plans
        assert registry.store.get(blob_key(result.sha256)) == expected.to_bytes(), (
            f"{workers} workers"
        )
        shown = registry.show(result.sha256)["metrics"]  # what show/fetch --json print
        assert shown["certified_psnr_mean"] == record["certified"]["psnr_mean"]
        assert shown["certified_psnr_p5"] == record["certified"]["psnr_p5"]
        assert shown["certified_samples"] == TRAJECTORIES and shown["certified_psnr_p5_bound"] is None
        stamps, messages = zip(*(line.split(" ", 1) for line in lines))  # each line: UTC time, message
        assert all(stamp.endswith("Z") and stamp[:4].isdigit() for stamp in stamps)
        lines = list(messages)
        assert "searching the plan for an ideal speed-up of at least 2.8x" in lines
        for stage, total in (("step profile", inner), ("certification", 1)):
            assert any(line.startswith(f"{stage}: plan {total}/{total} measured") for line in lines)
        assert sum(line.startswith("candidates: plan") for line in lines) == len(record["candidates_psnr"])
        assert not any("{" in line for line in lines)


def test_fidelity_target_on_the_fleet_is_the_in_process_plan_and_holds(ray_address, tmp_path):
    """``--target-psnr`` and ``--target-psnr-p5``: the fastest plan certified to keep them on
    fresh seeds, searched with the measurements fanned out, equal to the in-process search."""
    import torch

    from invardiff import calibrate
    from invardiff.models import load_builtin

    floors = {"min_psnr": 45.0, "min_psnr_p5": 40.0}
    budget = build_request(
        FLUX, steps=BUDGET_STEPS, trajectories=TRAJECTORIES, validate=0, budget=floors
    )
    torch.set_num_threads(1)
    pipe = load_builtin("digits-flux")
    pipe.set_progress_bar_config(disable=True)
    plan = calibrate(pipe, budget.calls, **floors, model_id=FLUX.source)
    calibration = {**plan.calibration, "job_key": budget.job_key, "prompts_sha256": None}
    expected = replace(
        plan, target=replace(plan.target, height=16, width=16), calibration=calibration
    )
    certified = plan.calibration["certified"]
    assert certified["psnr_mean"] >= 45.0 and certified["psnr_p5_bound"] >= 40.0
    assert certified["samples"] == TRAJECTORIES * 12  # 48: enough for the 5th percentile's bound
    assert 1.0 < plan.summary().ideal_speedup < BUDGET_STEPS / 2
    registry = open_registry(tmp_path / "home", create=True)
    registry.init()
    result = submit(registry, budget, RunOptions(workers=2, cpus_per_worker=0.5))
    assert result.phases["measure"]["workers"] == 2
    assert registry.store.get(blob_key(result.sha256)) == expected.to_bytes()


def test_a_killed_driver_is_resumed_computing_only_the_missing_shards(
    ray_address, home, request_, reference
):
    home = home.parent / "fresh-home"  # nothing there: the first driver creates the registry
    args = [*CLI_ARGS, "--workers", "1", "--validate", "0", "--ray-address", ray_address]
    first = cli_process(home, *args, lease=2)
    first_lines = wait_for_line(first, "phase 2: 1/4 trajectories")
    assert any("creating the embedded registry" in line for line in first_lines)
    first.send_signal(signal.SIGKILL)
    first.wait()
    registry = open_registry(home)
    stored = _shards(registry, request_.job_key, 1), _shards(registry, request_.job_key, 2)
    assert stored[0] == 4 and 1 <= stored[1] < 4
    from registry.jobs import get_job

    assert get_job(registry, request_.job_key).status == "running"  # its lease runs out
    code, result, err = finish(cli_process(home, *args, lease=2))
    assert code == 0, err
    assert result["created"] and result["attempts"] == 2
    assert result["phases"]["phase-1"] == {
        **result["phases"]["phase-1"],
        "computed": 0,
        "reused": 4,
    }
    assert result["phases"]["phase-2"]["computed"] == 4 - stored[1]
    assert result["phases"]["phase-2"]["reused"] == stored[1]
    assert registry.store.get(blob_key(result["sha256"])) == reference


def test_racing_drivers_compute_once_then_gate_promote_report_and_idempotency(
    ray_address, home, tmp_path, request_, reference
):
    args = [*CLI_ARGS, "--workers", "1", "--validate", "4", "--repeats", "1"]
    racers = [
        cli_process(home, *args, "--min-psnr", "200", "--ray-address", ray_address)
        for _ in range(2)
    ]
    outcomes = [finish(p) for p in racers]
    assert [code for code, _, _ in outcomes] == [QUALITY_GATE] * 2, outcomes
    assert sorted(result["created"] for _, result, _ in outcomes) == [False, True]
    for _, result, err in outcomes:
        assert not result["gate"]["passed"] and result["promoted"] is None
        assert "quality gate failed" in err.strip().splitlines()[-1]
    registry = open_registry(home)
    job = registry.show(outcomes[0][1]["sha256"])
    assert job["metrics"]["validation"]["samples"] == 4 and job["metrics"]["ideal_speedup"] > 1
    assert {"measured_speedup", "psnr_db", "ssim"} <= set(job["metrics"])
    assert (
        registry.store.get(blob_key(job["sha256"])) == reference
    )  # validation never changes bytes

    runner = CliRunner()
    report = tmp_path / "report"
    again = runner.invoke(
        main, [*args, "--min-psnr", "10", "--promote", "production", "--report", str(report)]
    )
    assert again.exit_code == 0, again.stderr
    data = json.loads(again.stdout)
    assert not data["created"] and data["promoted"] == "production" and data["attempts"] == 1
    assert (report / "validation.png").stat().st_size > 0 and (
        report / "plan.png"
    ).stat().st_size > 0
    assert json.loads((report / "result.json").read_text())["sha256"] == data["sha256"]
    listed = json.loads(runner.invoke(main, ["list", "--json"]).stdout)
    assert listed[0]["metrics"]["measured_speedup"] == data["metrics"]["measured_speedup"]
    assert listed[0]["aliases"] == ["production"]
    jobs = json.loads(
        runner.invoke(main, ["jobs", "list", "--status", "succeeded", "--json"]).stdout
    )
    assert [j["job_key"] for j in jobs] == [request_.job_key]
    shown = json.loads(
        runner.invoke(main, ["jobs", "show", request_.job_key[:10], "--json"]).stdout
    )
    assert (
        shown["result"]["version"] == 1 and shown["request"]["calls"] == request_.to_json()["calls"]
    )
    assert shown["progress"]["phase-2"]["done"] == TRAJECTORIES


def test_a_marked_plan_is_recalibrated_afresh_by_the_scheduler(
    ray_address, home, request_, reference
):
    """Age or a mark alone: the scheduler's job is new (its own key), runs on the workers and
    publishes the next version; the mark is then answered and nothing is due."""
    from invardiff.plan import CachePlan

    runner = CliRunner()
    args = [*CLI_ARGS, "--validate", "0", "--ray-address", ray_address]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.stderr
    made = json.loads(first.stdout)
    mark = runner.invoke(main, ["mark-stale", made["sha256"][:10], "--reason", "banding"])
    assert mark.exit_code == 0, mark.stderr
    due = runner.invoke(main, ["recalibrate", "--due", "--ray-address", ray_address, "--json"])
    assert due.exit_code == 0, due.stderr
    (entry,) = json.loads(due.stdout)["due"]
    assert entry["reasons"] == ["marked"] and entry["action"] == "calibrated", entry
    assert entry["created"] and entry["version"] == made["version"] + 1
    assert entry["job_key"] not in (request_.job_key, made["job_key"])
    registry = open_registry(home)
    fresh = CachePlan.from_bytes(registry.store.get(blob_key(entry["sha256"])))
    same = CachePlan.from_bytes(reference)  # deterministic: the same plan, another job
    assert fresh.calibration["job_key"] == entry["job_key"]
    assert (fresh.step_gate == same.step_gate).all()
    assert all((fresh.modules[k] == same.modules[k]).all() for k in same.modules)
    after = runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--json"])
    assert after.exit_code == 0 and json.loads(after.stdout)["due"] == []


def _no_trace(home: Path) -> None:
    registry = open_registry(home)
    from registry.jobs import list_jobs

    assert list_jobs(registry) == [] and registry.versions() == []
    assert list(registry.store.list("jobs/")) == []


def test_bad_input_is_one_line_with_its_exit_code_and_leaves_nothing(home, tmp_path, free_port):
    runner = CliRunner()
    base = ["calibrate", "digits-flux", "16", "--trajectories", "2"]
    cases = [
        (["calibrate", "no-such-model", "16"], 3, "unknown model"),
        (["calibrate", "digits-flux", "32"], 2, "only makes 16x16"),
        ([*base, "--q-step", "1.5"], 2, "q_step must be within [0, 1]"),
        ([*base, "--q-mlp", "0.5"], 2, "unknown calibration parameter"),
        ([*base, "--prompts", str(tmp_path / "none.txt")], 2, "--prompts does not apply"),
        ([*base, "--validate", "0", "--min-psnr", "30"], 2, "need validation samples"),
        ([*base, "--ray-address", f"127.0.0.1:{free_port}"], 5, "cannot reach the Ray cluster"),
        ([*base, "--set", "nonsense"], 2, "expected KEY=VALUE"),
        # without invardiff.budget: refused; with it: quantiles do not apply to a budget
        ([*base, "--target-speedup", "2", "--q-step", "0.5"], 2, "budget"),
        ([*base, "--target-psnr-p5", "-3"], 2, "--target-psnr-p5 must be a positive number"),
        ([*base, "--target-speedup", "2", "--target-psnr-p5", "30"], 2, "exactly one target"),
    ]
    for args, code, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == code, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr
        )
    _no_trace(home)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
