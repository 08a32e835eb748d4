"""The fleet's bad inputs and faults: every refusal is one line with its exit code, before any
work, leaving nothing behind; a signalled or killed driver is resumed into the same plan.

Issues 17 ("The fleet's inputs and faults") and 19 (items 2, 4 and 6); docs/fleet.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet_helpers import cli_process, finish, in_process_plan_bytes, open_registry, wait_for_line

from registry.cli import main
from registry.errors import InvalidInput
from registry.matching import ModelInfo, Resolution, canonical
from registry.service import BUILTIN_MODELS
from registry.store import blob_key
from workers.request import (
    MAX_PROMPT_CHARS,
    MAX_PROMPT_FILE_BYTES,
    MAX_PROMPTS,
    CalibrationRequest,
    build_request,
)

FLUX = next(m for m in BUILTIN_MODELS if m.name == "digits-flux")
BASE = ["calibrate", "digits-flux", "16", "--trajectories", "2"]


@pytest.fixture
def text_model(tmp_path: Path) -> ModelInfo:
    """A text-to-image alias on a local diffusers folder (configs only: nothing is loaded)."""
    folder = tmp_path / "text-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return ModelInfo(name="text-model", source=str(folder), revision=None, arch="flux",
                     pipeline="FluxPipeline", scheduler=None, scheduler_config_hash=None,
                     steps=4, height=32, width=32, guidance=3.5, dtype="float32")  # fmt: skip


def _refused(model: ModelInfo, path: Path) -> str:
    """The InvalidInput message of a request with prompt file ``path``, read on a thread that
    must finish within 5 s (a FIFO opened for reading blocks)."""
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            build_request(model, Resolution(32, 32), prompts_file=path, validate=0)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert outcome, f"reading {path} blocked"
    assert isinstance(outcome[0], InvalidInput), outcome[0]
    return str(outcome[0])


def test_prompt_files_are_bounded_regular_utf8_text(text_model, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = {
        "big": b"a" * (MAX_PROMPT_FILE_BYTES + 1),
        "long-line": b"b" * (MAX_PROMPT_CHARS + 1) + b"\n",
        "many": b"p\n" * (MAX_PROMPTS + 1),
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "latin1": "caf\xe9\n".encode("latin-1"),
        "nul": b"a prompt\x00with a NUL\n",
        "empty": b"\n  \n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = {
        Path("/dev/zero"): "not a regular file",
        fifo: "not a regular file",
        tmp_path: "not a regular file",
        tmp_path / "missing": "does not exist",
        tmp_path / "big": f"the limit is {MAX_PROMPT_FILE_BYTES} bytes",
        tmp_path / "long-line": f"the limit is {MAX_PROMPT_CHARS}",
        tmp_path / "many": f"over {MAX_PROMPTS} prompts",
        tmp_path / "binary": "not UTF-8",
        tmp_path / "latin1": "not UTF-8",
        tmp_path / "nul": "control character",
        tmp_path / "empty": "has no prompts",
    }
    for path, message in cases.items():
        assert message in _refused(text_model, path), path
    ok = tmp_path / "ok.txt"
    ok.write_text("a red apple\n\tmeta\u00efve caf\u00e9\t\n" + "c" * MAX_PROMPT_CHARS + "\n")
    request = build_request(text_model, Resolution(32, 32), prompts_file=ok, validate=0)
    assert request.prompts == ["a red apple", "meta\u00efve caf\u00e9", "c" * MAX_PROMPT_CHARS]


def test_the_job_row_holds_the_prompts_once_and_class_keys_stay(text_model, tmp_path, home):
    from registry import jobs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i} {'x' * 1500}\n" for i in range(8)))
    request = build_request(
        text_model, Resolution(32, 32), prompts_file=prompts, trajectories=512, validate=64
    )
    stored = request.to_json()
    assert stored["prompts"] == request.prompts and len(request.prompts) == 8
    assert all("prompt" not in c for c in [*stored["calls"], *stored["validation"]["calls"]])
    assert [c["prompt_index"] for c in stored["calls"][:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert CalibrationRequest.from_json(stored) == request  # the workers get the texts back
    assert request.calls[9]["prompt"] == request.prompts[1]
    assert len(canonical(stored)) < 8 * 1600 + 600 * 200  # not 576 x 1.5 kB of prompts

    registry = open_registry(home)
    claim = jobs.claim(registry, request.job_key, "text-model", stored, "test:1:a")
    assert claim.job.request == stored and "prompt" not in claim.job.request["calls"][0]
    # a class-conditional request has no prompt set: its key is the one it always had
    digits = build_request(FLUX, trajectories=4, validate=0)
    keyed = {k: v for k, v in digits.to_json().items() if k not in ("model", "validation")}
    assert "prompts" not in keyed or keyed.pop("prompts") is None
    keyed.pop("refresh")
    import hashlib

    assert digits.job_key == hashlib.sha256(canonical(keyed)).hexdigest()


def _no_trace(home: Path) -> None:
    from registry.jobs import list_jobs

    registry = open_registry(home)
    assert list_jobs(registry) == [] and registry.versions() == []
    assert list(registry.store.list("jobs/")) == []


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_calibrate_input_is_checked_before_any_work(home, tmp_path, free_port, monkeypatch):
    """Numbers at 0, negative, NaN, inf and absurdly large, --set values, short step counts,
    impossible guidance, report folders and Ray addresses: exit 2 (5 for a closed address),
    one line, no job row, no shard, no version, no report folder."""
    runner = CliRunner()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fresh = tmp_path / "new" / "report"
    huge = "1" + "0" * 30
    numbers = {
        "--trajectories": ["0", "-1", "5000", "nan", huge],
        "--steps": ["0", "-1", "1", "2", "nan", huge],
        "--guidance": ["nan", "inf", "-1", "1e7", "1e308"],
        "--workers": ["0", "-1", "5000", huge],
        "--worker-cpus": ["0", "-1", "nan", "inf", "1e308"],
        "--validate": ["-1", "5000", huge],
        "--repeats": ["0", "-1", "1000"],
        "--min-psnr": ["nan", "-1", "1e308"],
        "--min-speedup": ["inf", "-5"],
        "--q-step": ["nan", "-0.5", "1e308"],
        "--nonskip": ["1", "1e308"],
        "--max-consecutive": ["0", "-1", huge],
        "--target-speedup": ["nan", "0", "-2", "1e308"],
    }
    closed = ["--ray-address", f"127.0.0.1:{free_port}"]  # a missed check: exit 5, no compute
    cases = [([*BASE, flag, value, "--report", str(fresh), *closed], 2)
             for flag, values in numbers.items() for value in values]  # fmt: skip
    settings = ["max_consecutive=-1", 'max_consecutive="abc"', "max_consecutive=abc",
                "max_consecutive=1e400", "max_consecutive=2.5", "nonskip=NaN",
                'correct_flux_step_gate="yes"', "flag_index=3", "q_step=[1]"]  # fmt: skip
    cases += [([*BASE, "--set", setting, *closed], 2) for setting in settings]
    cases += [
        ([*BASE, "--report", str(a_file), *closed], 2),
        ([*BASE, "--report", "/proc/x", *closed], 2),
        ([*BASE, "--report", "/dev/null/x", *closed], 2),
        ([*BASE, "--ray-address", "http://x:y:z"], 2),
        ([*BASE, "--ray-address", "x:99999"], 2),
        ([*BASE, "--ray-address", "just-a-host"], 2),
        ([*BASE, *closed], 5),
    ]
    for args, code in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == code, (args, result.stderr, result.stdout[-500:])
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert "unexpected" not in result.stderr, (args, result.stderr)
    for lease in ("inf", "nan", "0", "-1", "1e308"):
        monkeypatch.setenv("INVARDIFF_JOB_LEASE_S", lease)
        result = runner.invoke(main, [*BASE, *closed])
        assert result.exit_code == 2 and "INVARDIFF_JOB_LEASE_S" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()  # the report probe leaves nothing
    _no_trace(home)
    monkeypatch.delenv("INVARDIFF_JOB_LEASE_S")
    monkeypatch.setenv("INVARDIFF_HOME", str(tmp_path / "fresh-home"))
    result = runner.invoke(main, [*BASE, "--report", "/proc/x", *closed])
    assert result.exit_code == 2 and not (tmp_path / "fresh-home").exists()  # not even created


def test_steps_and_guidance_limits_through_the_python_api():
    for steps in (1, 2):
        with pytest.raises(InvalidInput, match="--steps must be an integer within 3"):
            build_request(FLUX, steps=steps)
    with pytest.raises(InvalidInput, match="at most 1e\\+06"):
        build_request(FLUX, guidance=1e7)
    assert build_request(FLUX, steps=3, guidance=0.0).steps == 3


def test_recalibrate_max_age_and_job_prefixes_are_bounded(home):
    runner = CliRunner()
    for age in ("nan", "inf", "1e308", "-1", "4000"):
        result = runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--max-age", age])
        assert result.exit_code == 2, (age, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "--max-age" in result.stderr
    assert (
        runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--max-age", "30"]).exit_code == 0
    )
    for ref in ("1" * 100_000, "a" * 65):
        result = runner.invoke(main, ["jobs", "show", ref])
        assert result.exit_code == 2, result.stderr[:300]
        assert "at most 64" in result.stderr and len(result.stderr) < 300


def test_gc_removes_the_statistics_of_old_failed_jobs(home):
    from sqlalchemy import update

    from registry import jobs
    from registry.models import CalibrationJob, utcnow

    registry = open_registry(home)
    names = ("old-failed", "new-failed", "done", "running")
    keys = {name: hex_digit * 64 for name, hex_digit in zip(names, "abcd", strict=True)}
    for name, key in keys.items():
        jobs.claim(registry, key, "digits-flux", {}, "test:1:a")
        for obj in (f"jobs/{key}/phase-1/0", f"jobs/{key}/phase-1/1"):
            registry.store.put(obj, b"statistics")
        if "failed" in name:
            jobs.fail(registry, key, "test:1:a", "RuntimeError: boom", {})
        elif name == "done":
            jobs.finish(registry, key, "test:1:a", {}, {}, {})
    with registry.session() as session:
        session.execute(update(CalibrationJob).where(CalibrationJob.job_key != keys["new-failed"])
                        .values(finished_at=utcnow() - timedelta(days=8)))  # fmt: skip

    dry = registry.gc(timedelta(hours=1), dry_run=True, failed_job_age=timedelta(days=7))
    assert dry["failed_jobs"] == [keys["old-failed"]] and len(dry["job_objects"]) == 2
    assert len(list(registry.store.list("jobs/"))) == 8
    result = CliRunner().invoke(main, ["gc", "--failed-job-age", str(7 * 86400), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["failed_jobs"] == [keys["old-failed"]]
    assert data["freed_bytes"] == 2 * len(b"statistics")
    left = {o.key.split("/")[1] for o in registry.store.list("jobs/")}
    assert left == {keys["new-failed"], keys["done"], keys["running"]}
    assert jobs.get_job(registry, keys["old-failed"]).status == "failed"  # the row stays
    bad = CliRunner().invoke(main, ["gc", "--failed-job-age", "-1"])
    assert bad.exit_code == 2


# ---- a signalled or killed driver, on the real local Ray ---------------------------------
TRAJECTORIES = 4


@pytest.fixture(scope="module")
def small_request():
    return build_request(FLUX, trajectories=TRAJECTORIES, validate=0)


@pytest.fixture(scope="module")
def small_reference(small_request) -> bytes:
    return in_process_plan_bytes(small_request)


def test_signalled_and_killed_drivers_are_resumed_into_one_plan(
    ray_address, home, small_request, small_reference, monkeypatch
):
    """SIGTERM, kill -9 and SIGINT of the driver in phase 1 (each after its first computed
    shard but the first), then kill -9 right after it published: one line and exit 143 / 130,
    never Ray's C++ stack; the job is failed (signals) or its lease runs out (kill -9); the
    last rerun publishes once, with the bytes of the in-process calibration."""
    from registry.jobs import get_job

    args = [*BASE[:3], "--trajectories", str(TRAJECTORIES), "--workers", "1", "--validate", "0",
            "--ray-address", ray_address, "--json"]  # fmt: skip
    registry = open_registry(home)
    stored = lambda: len(list(registry.store.list(f"jobs/{small_request.job_key}/phase-1/")))
    for signum, code, after in [
        (signal.SIGTERM, 143, "phase 1: 0/4 trajectories already stored"),
        (signal.SIGKILL, -9, "trajectories, ETA"),  # a trajectory computed in this run
        (signal.SIGINT, 130, "trajectories, ETA"),
    ]:
        process = cli_process(home, *args, lease=2)
        lines = wait_for_line(process, after)
        assert stored() < TRAJECTORIES, "the signal would not land in phase 1"
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
        err = "".join(lines) + err
        assert process.returncode == code, err
        if signum == signal.SIGKILL:
            assert out == "", out  # killed: nothing printed
        else:  # --json: the error object with the exit code (docs/fleet.md)
            assert json.loads(out) == {"error": err.strip().splitlines()[-1].split("error: ", 1)[1], "exit_code": code}
        job = get_job(registry, small_request.job_key)
        if signum == signal.SIGKILL:
            assert job.status == "running"  # until its lease runs out
            continue
        name = signal.Signals(signum).name
        assert f"error: interrupted by {name}" in err.strip().splitlines()[-1], err
        assert "***" not in err and "logging.cc" not in err and "Traceback" not in err, err
        assert job.status == "failed" and job.error.startswith("Interrupted"), job
    phase_1 = stored()
    assert phase_1 >= 2
    monkeypatch.setenv("INVARDIFF_FAULT", "publish.committed:kill")  # kill -9 once published
    code, _, err = finish(cli_process(home, *args, lease=2))
    monkeypatch.delenv("INVARDIFF_FAULT")
    assert code == -signal.SIGKILL and "published" not in err, err
    (published,) = registry.versions()
    assert get_job(registry, small_request.job_key).status == "running"
    code, result, err = finish(cli_process(home, *args, lease=2))
    assert code == 0, err
    assert result["created"] and result["attempts"] == 5
    assert result["phases"]["phase-1"]["reused"] == result["phases"]["phase-2"]["reused"] == 4
    assert "same bytes as before" in err and result["sha256"] == published["sha256"]
    assert registry.store.get(blob_key(result["sha256"])) == small_reference
    assert len(registry.versions()) == 1


# ---- secrets ------------------------------------------------------------------------------
PASSWORD = "Pg-pw-7f3a9c1e"
AWS_SECRET = "aws-secret-b41d6e0f92"


@pytest.fixture
def postgres_url_with_password():
    """A fresh PostgreSQL database (trust auth: the password is accepted and ignored)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = os.environ.get(
        "INVARDIFF_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"invardiff_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure: no server here
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    url = make_url(admin_url).set(database=name, password=PASSWORD)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_secrets_appear_nowhere_when_a_calibration_fails(tmp_path, postgres_url_with_password):
    """A job whose workers cannot load the checkpoint (exit 9) on a local Ray the command
    starts: neither the database password nor the AWS secret is in stdout, stderr, the job
    row, the report folder or any Ray log, and no Ray process is left."""
    import subprocess
    import sys

    from fleet_helpers import RAY_ENV, ROOT
    from sqlalchemy import create_engine, text

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths are short
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "INVARDIFF_HOME": str(tmp_path / "home"), "INVARDIFF_STORE_URL": str(tmp_path / "store"),
           "INVARDIFF_DATABASE_URL": postgres_url_with_password, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "RAY_TMPDIR": str(ray_tmp)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "registry", *args], env=env, cwd=ROOT, check=False,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    assert run("init").returncode == 0
    added = run("models", "add", "broken", str(broken), "--arch", "flux", "--pipeline",
                "FluxPipeline", "--resolution", "32", "--steps", "4")  # fmt: skip
    assert added.returncode == 0, added.stderr
    report = tmp_path / "report"
    failed = run("calibrate", "broken", "32", "--trajectories", "1", "--validate", "0",
                 "--workers", "1", "--worker-cpus", "0.5", "--report", str(report), "--json")  # fmt: skip
    assert failed.returncode == 9, failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("invardiff-registry: error: ")
    shown = run("jobs", "list", "--json")
    with create_engine(postgres_url_with_password).connect() as connection:
        rows = [str(r) for r in connection.execute(text("SELECT * FROM calibration_jobs"))]
    assert len(rows) == 1 and "failed" in rows[0]
    texts = {"stdout": failed.stdout, "stderr": failed.stderr, "jobs": shown.stdout, "row": rows[0]}
    files = [p for folder in (ray_tmp, tmp_path / "home", tmp_path / "store", report)
             for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]  # fmt: skip
    assert any("worker" in p.name for p in files)  # Ray's logs were written and are searched
    for path in files:
        texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for where, content in texts.items():
        for secret in (PASSWORD, AWS_SECRET):
            assert secret not in content, f"{secret} in {where}"
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(ray_tmp) not in processes.stdout  # the command's Ray is gone
    shutil.rmtree(ray_tmp)
