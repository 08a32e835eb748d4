"""Scheduled recalibration: staleness rules, operators' marks, ``recalibrate --due``.

The rules run against real SQLite and PostgreSQL; the race runs two real ``recalibrate``
processes against one database and a real Ray job server (token auth on).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from registry_helpers import FLUX_PLANS, ROOT, cli_env, make_registry, publish_digits
from sqlalchemy import select, update

from registry import jobs
from registry.cli import main
from registry.errors import NOT_FOUND, UNREACHABLE, USAGE, InvalidInput, NotFound
from registry.matching import ModelInfo, Resolution, TargetKey
from registry.models import CalibrationJob, PlanVersion
from registry.staleness import PlanState, Policy, find_due, mark_stale, stale_reasons
from workers.schedule import current_policy, recalibration_request

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
VERSIONS = {"calibrator": "1", "torch": "2.13.0+cu128", "diffusers": "0.42.1"}
DIT = ModelInfo(name="digits-dit", source="builtin://digits-dit", revision=None, arch="dit")


# ---- the rules, as a pure function ----------------------------------------------------------
def state(**changes) -> PlanState:
    base = PlanState(
        model=DIT,
        target=TargetKey(
            "builtin://digits-dit",
            None,
            "DiTPipeline",
            "DDIMScheduler",
            None,
            50,
            16,
            16,
            1.25,
            "float32",
        ),
        version=1,
        sha256="ab" * 32,
        created_at=NOW - timedelta(days=10),
        calibrated_at=NOW - timedelta(days=10),
        calibration={
            "calibrator_version": "1",
            "libraries": {"torch": "2.13.1", "diffusers": "0.42.0"},
        },
    )
    return replace(base, **changes)


def reasons(plan: PlanState, max_age_days: float | None = None) -> list[str]:
    age = None if max_age_days is None else timedelta(days=max_age_days)
    return sorted(stale_reasons(plan, Policy(VERSIONS, age, NOW)))


def test_rules() -> None:
    assert reasons(state()) == []  # patch versions differ: same minor
    assert reasons(state(), max_age_days=30) == []
    assert reasons(state(), max_age_days=7) == ["too_old"]
    libraries = {"torch": "2.12.1", "diffusers": "0.42.1"}
    assert reasons(state(calibration={"calibrator_version": "1", "libraries": libraries})) == [
        "library_changed"
    ]
    assert reasons(state(calibration={"calibrator_version": "0"})) == ["calibrator_changed"]
    assert reasons(state(calibration={"source": "reference"})) == []  # imported: not ours
    marked = state(marked_at=NOW - timedelta(days=1), marked_by="ops", marked_reason="blurry")
    assert reasons(marked) == ["marked"]
    recalibrated = replace(marked, calibrated_at=NOW - timedelta(hours=1))
    assert reasons(recalibrated) == []  # a calibration after the mark ends it
    moved = state(model=replace(DIT, revision="r2"), calibration={"calibrator_version": "0"})
    assert reasons(moved, max_age_days=1) == ["revision_changed"]  # the old plan's age is moot
    details = stale_reasons(moved, Policy(VERSIONS, None, NOW))["revision_changed"]
    assert details == {"plan": None, "model": "r2"}


# ---- the query, on SQLite and PostgreSQL ----------------------------------------------------
def due_by_model(registry, max_age_days: float | None = None) -> dict[tuple, list[str]]:
    with registry.session() as session:
        due = find_due(session, current_policy(max_age_days))
    return {(d.plan.model.name, d.plan.target.guidance): d.to_json()["reasons"] for d in due}


def test_find_due_follows_revisions_versions_age_and_marks(registry, tmp_path: Path) -> None:
    fresh = publish_digits(registry, tmp_path, 1.25)
    publish_digits(registry, tmp_path, 2.0, torch="1.13.0")
    flux = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    assert due_by_model(registry) == {("digits-dit", 2.0): ["library_changed"]}

    marked = mark_stale(registry, flux.version.sha256[:10], reason="banding")
    assert marked["marked_by"] and marked["reason"] == "banding"
    registry.add_model("flux-twin", flux.target.source, "0123abc", "flux", {})  # same checkpoint
    assert due_by_model(registry)[("flux-dev", 3.5)] == ["marked"]  # listed once, not per alias
    assert ("flux-twin", 3.5) not in due_by_model(registry)

    registry.add_model("flux-dev", flux.target.source, "4567def", "flux", {}, update=True)
    due = due_by_model(registry)
    assert due[("flux-dev", 3.5)] == ["revision_changed"]  # its old plan, for the new revision
    assert due[("flux-twin", 3.5)] == ["marked"]  # the twin still serves the old revision

    with registry.session() as session:  # the plan was published 40 days ago
        session.execute(
            update(PlanVersion)
            .where(PlanVersion.sha256 == fresh.version.sha256)
            .values(created_at=datetime.now(timezone.utc) - timedelta(days=40))
        )
    assert due_by_model(registry, 30)[("digits-dit", 1.25)] == ["too_old"]
    with registry.session() as session:  # ... and recalibrated (same bytes) yesterday
        target_id = session.scalar(
            select(PlanVersion.target_id).where(PlanVersion.sha256 == fresh.version.sha256)
        )
        session.add(
            CalibrationJob(
                job_key="f" * 64,
                model="digits-dit",
                request={},
                status="succeeded",
                target_id=target_id,
                finished_at=datetime.now(timezone.utc) - timedelta(days=1),
            )
        )
    assert ("digits-dit", 1.25) not in due_by_model(registry, 30)


def test_mark_stale_only_marks_the_latest_plan(registry, tmp_path: Path) -> None:
    first = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    registry.publish(FLUX_PLANS[1], "flux-dev", Resolution.parse("1024"))
    with pytest.raises(InvalidInput, match="only the latest plan"):
        mark_stale(registry, first.version.sha256)
    with pytest.raises(NotFound):
        mark_stale(registry, "abcdef0123")


def test_requests_keep_the_job_and_change_only_what_made_them_stale(registry, tmp_path) -> None:
    publish_digits(registry, tmp_path, 1.25, torch="1.13.0")
    policy = current_policy(None)
    with registry.session() as session:
        (due,) = find_due(session, policy)
    request = recalibration_request(registry, due, policy.versions)
    assert (request.model, request.steps, request.guidance, len(request.calls)) == (
        "digits-dit",
        50,
        1.25,
        2,
    )
    assert request.versions == policy.versions and request.refresh is None
    assert recalibration_request(registry, due, policy.versions).job_key == request.job_key

    # A plan made by a job: the job's request, re-aimed; age alone asks for a fresh job.
    job, _ = jobs.ensure_job(registry, request.job_key, "digits-dit", request.to_json())
    with registry.session() as session:
        session.execute(
            update(PlanVersion).values(
                calibration_job_id=session.scalar(
                    select(CalibrationJob.id).where(CalibrationJob.job_key == job.job_key)
                )
            )
        )
        (old,) = find_due(session, policy)
        aged = replace(old, reasons={"too_old": {}}, plan=replace(old.plan, calibration={}))
    again = recalibration_request(registry, aged, policy.versions)
    assert again.calls == request.calls and again.params == request.params
    assert again.refresh.startswith(old.plan.sha256) and again.versions == policy.versions
    assert again.job_key != request.job_key


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_marks_and_dry_runs_without_writing(config, tmp_path: Path, monkeypatch) -> None:
    registry = make_registry(config)
    publish_digits(registry, tmp_path, 1.25, torch="1.13.0")
    for name, value in cli_env(config).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    dry = runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.stderr
    (entry,) = json.loads(dry.stdout)["due"]
    assert entry["action"] == "would_submit" and entry["reasons"] == ["library_changed"]
    assert entry["target"]["guidance"] == 1.25 and len(entry["job_key"]) == 64
    assert jobs.list_jobs(registry) == []  # a dry run writes nothing
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    down = runner.invoke(
        main, ["recalibrate", "--due", "--ray-address", f"http://127.0.0.1:{closed}"]
    )
    assert down.exit_code == UNREACHABLE and "cannot reach the Ray job server" in down.stderr
    assert jobs.list_jobs(registry) == []  # nothing inserted when the job server is down
    here = runner.invoke(
        main, ["recalibrate", "--due", "--ray-address", f"ray://127.0.0.1:{closed}"]
    )
    assert here.exit_code == UNREACHABLE and "cannot reach the Ray cluster" in here.stderr
    assert [(j.job_key, j.status) for j in jobs.list_jobs(registry)] == [
        (entry["job_key"], "pending")
    ]
    usage = runner.invoke(main, ["recalibrate", "--due", "--job", "abcdef"])
    assert usage.exit_code == USAGE and "exactly one of --due and --job" in usage.stderr
    missing = runner.invoke(main, ["mark-stale", "0123456789"])
    assert missing.exit_code == NOT_FOUND and "no plan" in missing.stderr
    marked = runner.invoke(
        main, ["mark-stale", entry["plan"]["sha256"][:8], "--reason", "x", "--json"]
    )
    assert marked.exit_code == 0 and json.loads(marked.stdout)["reason"] == "x"
    dry = runner.invoke(main, ["recalibrate", "--due", "--dry-run"])
    assert "library_changed,marked" in dry.stdout
    # --job runs a stored job; one that already succeeded is answered from its row, no Ray.
    jobs.ensure_job(registry, entry["job_key"], "digits-dit", {})
    with registry.session() as session:
        session.execute(update(CalibrationJob).values(status="succeeded", result={"version": 7}))
    done = runner.invoke(main, ["recalibrate", "--job", entry["job_key"][:10], "--json"])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout) == {
        "job_key": entry["job_key"],
        "model": "digits-dit",
        "action": "succeeded",
        "version": 7,
    }
    unknown = runner.invoke(main, ["recalibrate", "--job", "0123456789"])
    assert unknown.exit_code == NOT_FOUND
    # A due plan whose request cannot be built (no local snapshot of the new revision): the
    # report says why, the others still go, and the exit code is 1.
    flux = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    registry.add_model("flux-dev", flux.target.source, "4567def", "flux", {}, update=True)
    failed = runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--json"])
    assert (
        failed.exit_code == 1 and "1 due plan(s) could not be submitted or failed" in failed.stderr
    )
    actions = {e["model"]: e for e in json.loads(failed.stdout)["due"]}
    assert actions["digits-dit"]["action"] == "succeeded"
    assert (
        "no snapshot" in actions["flux-dev"]["error"] and "4567def" in actions["flux-dev"]["error"]
    )


# ---- two schedulers at once, a real Ray job server ------------------------------------------
# The job server is queried from a subprocess: Ray reads RAY_AUTH_MODE when it is imported, and
# this test process may have imported it already with other settings.
_JOBS_SCRIPT = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
deadline = time.monotonic() + 120
while True:
    try:
        client = JobSubmissionClient()  # RAY_ADDRESS
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
found = [
    {"submission_id": j.submission_id, "entrypoint": j.entrypoint, "metadata": j.metadata or {},
     "status": str(getattr(j.status, "value", j.status)), "message": j.message}
    for j in client.list_jobs()
]
for sid in sys.argv[1:]:
    client.stop_job(sid)
print(json.dumps(found))
"""


def ray_jobs(env: dict[str, str], *stop: str) -> list[dict]:
    """The job server's submissions (waiting for it to answer); stops the ``stop`` ones."""
    done = subprocess.run(
        [sys.executable, "-c", _JOBS_SCRIPT, *stop],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return json.loads(done.stdout)


# What a submitted job runs on the head: this tree's CLI, held while the HOLD file exists (so
# that submissions stay pending for the race below), then run against a database that cannot
# be reached: a submission that fails before its job starts (the head's bad database URL).
_SHIM = """#!/bin/sh
while [ -e "{hold}" ]; do sleep 0.2; done
exec "{python}" -m registry "$@"
"""
HEAD_DATABASE_URL = "postgresql+psycopg://invardiff@127.0.0.1:1/unreachable"


@pytest.fixture(scope="module")
def ray_job_server():
    """A Ray head (its own process group) with the job server and token auth; a client env
    (with ``HOLD``: the file that holds submitted jobs, see ``_SHIM``)."""
    ports = []
    for _ in range(4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    gcs, dashboard, client, agent = ports
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    shim, hold = Path(folder) / "bin", Path(folder) / "hold"
    shim.mkdir()
    hold.touch()
    (shim / "invardiff-registry").write_text(_SHIM.format(hold=hold, python=sys.executable))
    (shim / "invardiff-registry").chmod(0o755)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)}
    head_env = {**os.environ, **env, "PATH": f"{shim}:{os.environ['PATH']}",
                "PYTHONPATH": str(ROOT), "INVARDIFF_DATABASE_URL": HEAD_DATABASE_URL,
                "INVARDIFF_STORE_URL": str(Path(folder) / "store")}  # fmt: skip
    command = [
        shutil.which("ray") or "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=0",
        "--disable-usage-stats",
        f"--temp-dir={folder}",
    ]
    head = subprocess.Popen(
        command,
        env=head_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    try:
        assert ray_jobs(env) == []
        yield {**env, "HOLD": str(hold)}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


def scheduler_env(config, server: dict[str, str]) -> dict[str, str]:
    client = {k: v for k, v in server.items() if k != "HOLD"}
    return {**os.environ, **cli_env(config), **client, "PYTHONPATH": str(ROOT)}


def test_two_schedulers_at_once_submit_each_job_once(config, tmp_path, ray_job_server) -> None:
    registry = make_registry(config)
    guidance = 1 + secrets.randbelow(10**6) / 10**6  # new job keys for each database
    publish_digits(registry, tmp_path, guidance, torch="1.13.0")
    publish_digits(registry, tmp_path, guidance + 1, diffusers="0.1.0")
    env = scheduler_env(config, ray_job_server)
    command = [sys.executable, "-m", "registry", "recalibrate", "--due", "--json"]
    runs = [
        subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    reports = [json.loads(out)["due"] for out, _ in outputs]
    keys = {entry["job_key"] for entry in reports[0]}
    assert len(keys) == 2 and keys == {entry["job_key"] for entry in reports[1]}
    for key in keys:
        mine = [e for report in reports for e in report if e["job_key"] == key]
        assert sum(e["inserted"] for e in mine) == 1  # the unique job_key: one row
        assert sorted(e["action"] for e in mine) == ["already_submitted", "submitted"]
    assert sorted(r.job_key for r in jobs.list_jobs(registry)) == sorted(keys)
    ids = sorted(f"invardiff-{key}-0" for key in keys)
    submitted = [
        j for j in ray_jobs(ray_job_server, *ids) if j["metadata"].get("invardiff_job_key") in keys
    ]
    assert sorted(j["submission_id"] for j in submitted) == ids  # once each
    for job in submitted:
        key = job["metadata"]["invardiff_job_key"]
        assert job["entrypoint"].split()[:4] == ["invardiff-registry", "recalibrate", "--job", key]


def recalibrate(env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    """``recalibrate --due --json ARGS`` in a subprocess: exit code, report, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "registry", "recalibrate", "--due", "--json", *args],
        check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


_WAIT_SCRIPT = """
import sys, time
from ray.job_submission import JobSubmissionClient
client, deadline = JobSubmissionClient(), time.monotonic() + 150  # RAY_ADDRESS
while str(client.get_job_status(sys.argv[1])) not in ("FAILED", "SUCCEEDED", "STOPPED"):
    assert time.monotonic() < deadline, "the job did not end"
    time.sleep(0.5)
"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_submission_that_fails_before_its_job_starts_is_failed_and_retried(
    config, tmp_path, ray_job_server
) -> None:
    """Two jobs: one whose Ray job fails before its driver claims it (the head's database is
    unreachable), one whose submission the job server forgot (a head that lost its jobs)."""
    registry = make_registry(config)
    guidance = 1 + secrets.randbelow(10**6) / 10**6  # job keys of their own on this server
    publish_digits(registry, tmp_path, guidance, torch="1.13.0")
    publish_digits(registry, tmp_path, guidance + 1, torch="1.13.0")
    env, hold = scheduler_env(config, ray_job_server), Path(ray_job_server["HOLD"])
    code, report, err = recalibrate(env)
    assert code == 0, err
    assert [e["action"] for e in report["due"]] == ["submitted"] * 2
    failing, vanished = (e["job_key"] for e in report["due"])
    first = f"invardiff-{failing}-0"
    with registry.session() as session:  # the head lost the other one
        session.execute(
            update(CalibrationJob)
            .where(CalibrationJob.job_key == vanished)
            .values(attempts=5, lineage={"submission": {"id": f"invardiff-{vanished}-5"}})
        )
    hold.unlink()  # the held jobs run, and fail at once: the head's database is unreachable
    try:
        subprocess.run([sys.executable, "-c", _WAIT_SCRIPT, first], check=True, timeout=180,
                       env={**os.environ, **ray_job_server})  # fmt: skip
    finally:
        hold.touch()
    job = jobs.get_job(registry, failing)
    assert (job.status, job.attempts, job.error) == ("pending", 0, None)  # what the issue saw
    # The dry run and the real run agree: both failed, both are submitted again, exit 1.
    for args, action in ((["--dry-run"], "would_resubmit"), ([], "resubmitted")):
        code, report, err = recalibrate(env, *args)
        assert code == 1 and "2 Ray submission(s) failed before their job started" in err
        entries = {e["job_key"]: e for e in report["due"]}
        assert {e["action"] for e in entries.values()} == {action}
        assert entries[failing]["failed_submission"] == first
        assert f"Ray job {first} ended FAILED before its job started" in entries[failing]["error"]
        assert "exit code 5" in entries[failing]["error"]
        gone = f"Ray job invardiff-{vanished}-5 vanished from the job server"
        assert entries[vanished]["error"].startswith(gone)
    assert entries[failing]["submission_id"] == f"invardiff-{failing}-1"
    assert entries[vanished]["submission_id"] == f"invardiff-{vanished}-6"
    job = jobs.get_job(registry, failing)
    assert (job.status, job.attempts) == ("failed", 1) and "ended FAILED" in job.error
    assert jobs.get_job(registry, vanished).attempts == 6
    ray_jobs(ray_job_server, f"invardiff-{failing}-1", f"invardiff-{vanished}-6")  # held: stop
