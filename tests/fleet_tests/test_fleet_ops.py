"""Fleet operations on a real local Ray: damaged shards, ``jobs reset``, a lost worker under
``--json``, worker counts and GPU requests, progress lines and worker logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet_helpers import RAY_ENV, ROOT, cli_process, finish, open_registry, wait_for_line

from registry.cli import main
from registry.jobs import history
from registry.service import BUILTIN_MODELS
from registry.store import blob_key
from workers.driver import RunOptions, submit
from workers.errors import JobFailed
from workers.pool import MAX_WORKERS_ENV, START_TIMEOUT_ENV, plan_workers
from workers.request import build_request

FLUX = next(m for m in BUILTIN_MODELS if m.name == "digits-flux")
QUICK = ["--trajectories", "2", "--steps", "8", "--validate", "0"]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_damaged_shards_are_named_and_recomputed_after_a_reset(ray_address, home):
    """A shard truncated and two swapped in the store between runs: the rerun (after
    ``jobs reset``) names each, computes them again and publishes the same bytes."""
    request = build_request(FLUX, steps=8, trajectories=2, validate=0)
    registry = open_registry(home)
    first = submit(registry, request, RunOptions(workers=1))
    store = registry.store
    truncated = request.shard_key(1, 0)
    store.put(truncated, store.get(truncated)[:-100])
    a, b = request.shard_key(2, 0), request.shard_key(2, 1)
    first_a, first_b = store.get(a), store.get(b)
    store.put(a, first_b)
    store.put(b, first_a)

    runner = CliRunner()
    reset = runner.invoke(main, ["jobs", "reset", request.job_key[:12], "--json"])
    assert reset.exit_code == 0, reset.stderr
    assert json.loads(reset.stdout)["status"] == "pending"
    again = runner.invoke(
        main, ["calibrate", "digits-flux", "16", *QUICK, "--workers", "1", "--json"]
    )
    assert again.exit_code == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["created"] and result["sha256"] == first.sha256
    assert result["phases"]["phase-1"]["computed"] == 1
    assert result["phases"]["phase-2"]["computed"] == 2
    assert store.get(blob_key(result["sha256"])) == store.get(blob_key(first.sha256))
    for key in (truncated, a, b):
        assert f"shard {key} is damaged" in again.stderr
    assert "truncated" in again.stderr and "holds shard phase-2/1" in again.stderr
    events = [e["event"] for e in history(registry, request.job_key)]
    assert events.count("damaged_shard") == 3 and "reset" in events
    assert events[-1] == "succeeded"


def test_reset_is_refused_under_a_live_lease_and_for_unknown_jobs(home):
    from registry.jobs import claim

    registry = open_registry(home)
    key = "ab" * 32
    claim(registry, key, "digits-flux", {}, "host:1:x", lease_seconds=60)
    runner = CliRunner()
    busy = runner.invoke(main, ["jobs", "reset", key[:8]])
    assert busy.exit_code == 7 and "live lease" in busy.stderr
    missing = runner.invoke(main, ["jobs", "reset", "cdcdcdcd"])
    assert missing.exit_code == 3 and len(missing.stderr.strip().splitlines()) == 1


def test_a_lost_worker_under_json_keeps_stdout_json_and_the_history(ray_address, home):
    """Ray prints ``(raylet) ...`` when a worker dies: never on stdout. The dead worker is
    not listed as used; ``jobs show`` keeps the loss with its time; progress lines carry a
    timestamp and an ETA; the worker's log has each shard's start and end."""
    args = ["calibrate", "digits-flux", "16", "--trajectories", "4", "--steps", "8",
            "--validate", "0", "--workers", "1", "--ray-address", ray_address, "--json"]  # fmt: skip
    process = cli_process(home, *args)
    lines = wait_for_line(process, "worker 1 ready")
    pid = int(re.search(r"pid (\d+)", lines[-1])[1])
    lines += wait_for_line(process, "phase 1: 1/4 trajectories")
    os.kill(pid, signal.SIGKILL)
    code, result, err = finish(process)
    assert code == 0, err
    assert result["worker_restarts"] >= 1
    assert pid not in [w["pid"] for w in result["workers"]]
    assert [w["pid"] for w in result["workers_lost"]] == [pid]
    assert result["workers_used"] == len(result["workers"]) == 1
    first_done = next(line for line in lines if "phase 1: 1/4 trajectories" in line)
    assert re.fullmatch(rf"{STAMP} phase 1: 1/4 trajectories, ETA \d+ s", first_done.strip())
    shown = CliRunner().invoke(main, ["jobs", "show", result["job_key"][:12], "--json"])
    events = json.loads(shown.stdout)["history"]
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert lost and f"pid {pid}" in lost[0]["detail"] and re.match(STAMP[:-1], lost[0]["at"])
    assert events[0]["event"] == "attempt" and events[-1]["event"] == "succeeded"
    logs = _worker_logs()
    assert re.search(r"shard phase-1/0: start", logs)
    assert re.search(r"shard phase-1/0: end, \d+\.\d\d s", logs)


def _worker_logs() -> str:
    import ray

    folder = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    texts = []
    for name in os.listdir(folder):
        if name.startswith("worker-") and name.endswith(".err"):
            with open(os.path.join(folder, name), errors="replace") as file:
                texts.append(file.read())
    return "\n".join(texts)


def test_failure_under_json_prints_an_error_object(ray_address, home, monkeypatch):
    """GPUs asked of a cluster that never offers them: the documented start timeout, and
    ``--json`` still prints an object with the error and the exit code."""
    monkeypatch.setenv("INVARDIFF_WORKER_GPUS", "1")
    monkeypatch.setenv(START_TIMEOUT_ENV, "3")
    result = CliRunner().invoke(
        main, ["calibrate", "digits-flux", "16", *QUICK, "--ray-address", ray_address, "--json"]
    )
    assert result.exit_code == JobFailed.exit_code, result.stderr
    data = json.loads(result.stdout)
    assert data["exit_code"] == JobFailed.exit_code
    assert "no worker became ready in 3 s" in data["error"]
    assert "workers: 2, 1 GPU each" in result.stderr  # asked although the cluster has none


def test_worker_counts_follow_what_the_cluster_can_offer(ray_address, monkeypatch):
    """The session's Ray has 2 CPUs and no GPU."""
    local = plan_workers(1000, 8, 1.0, local=True)
    assert (local.count, local.gpus) == (2, 0) and "capped at 2" in local.reason
    assert plan_workers(None, 8, 0.5, local=True).count == 4
    assert plan_workers(None, 3, 0.5, local=True).count == 3  # one per trajectory at most
    monkeypatch.setenv(MAX_WORKERS_ENV, "6")
    scaled = plan_workers(1000, 8, 1.0, gpus_per_worker=1)  # GPUs asked, none there yet
    assert (scaled.count, scaled.gpus) == (6, 1) and MAX_WORKERS_ENV in scaled.reason
    assert plan_workers(None, 8, 1.0, gpus_per_worker=1).count == 6
    monkeypatch.delenv(MAX_WORKERS_ENV)
    assert plan_workers(None, 5, 1.0, gpus_per_worker=1).count == 5  # nothing known: 1/call


LOCAL_SESSION = """
import json
from workers.pool import plan_workers, ray_session
with ray_session(None) as local:  # stdout is stderr in there: Ray's output goes there
    plan = plan_workers(1000, 64, 1.0, local=local)
    data = {"local": local, **plan.to_json()}
print(json.dumps(data))
"""


def test_workers_1000_on_a_local_ray_are_capped_at_its_cpus():
    """A local Ray started for a command declares the machine's CPUs (not ``--workers``), and
    ``--workers 1000`` is capped at them, saying why (the driver prints the reason on stderr
    and records the plan in the result's ``worker_plan``)."""
    import subprocess
    import sys

    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", LOCAL_SESSION], check=False, env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    cpus = os.cpu_count() or 1
    assert data["local"], done.stderr
    assert data["count"] == data["cap"] == cpus and data["requested"] == 1000
    assert (
        data["reason"]
        == f"asked 1000, capped at {cpus}: the CPUs of this local Ray hold {cpus} worker(s)"
    )


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> dict[str, Path]:
    """Both digits models as ``save_pretrained`` writes them."""
    from invardiff.models import load_builtin

    folders = {}
    for name in ("digits-flux", "digits-dit"):
        folders[name] = tmp_path_factory.mktemp(name)
        load_builtin(name).save_pretrained(folders[name])
    return folders


def test_a_saved_digits_pipeline_loads_from_its_folder(saved_folders):
    import numpy as np
    import torch

    from invardiff.models import load_builtin
    from workers.pipelines import check_checkpoint, load_pipeline

    for name, folder in saved_folders.items():
        check_checkpoint(str(folder), None)
        loaded = load_pipeline(str(folder), None, None, "cpu")
        builtin = load_builtin(name)
        builtin.set_progress_bar_config(disable=True)
        assert type(loaded) is type(builtin)
        images = [
            pipe(class_labels=[3], num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(5)).images
            for pipe in (loaded, builtin)
        ]  # fmt: skip
        assert np.array_equal(*images), name


def _broken(folder: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / how
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    if how == "no-weights":
        (copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "unknown-pipeline":
        index["_class_name"] = "NoSuchPipeline"
    elif how == "unknown-component":
        index["class_embeddings"] = ["invardiff.models.digits", "NoSuchModule"]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_an_unloadable_folder_is_refused_before_any_worker_starts(home, tmp_path, saved_folders):
    runner = CliRunner()
    expected = {
        "no-weights": "component 'transformer' has no weights",
        "unknown-pipeline": "pipeline class 'NoSuchPipeline' is neither",
        "unknown-component": "invardiff.models.digits.NoSuchModule cannot be imported",
    }
    for how, message in expected.items():
        folder = tmp_path / how  # loadable when added (models add checks it), broken after
        shutil.copytree(saved_folders["digits-flux"], folder)
        added = runner.invoke(main, ["models", "add", how, str(folder), "--arch", "flux",
                                     "--pipeline", "DigitsFluxPipeline", "--resolution", "16",
                                     "--steps", "8"])  # fmt: skip
        assert added.exit_code == 0, added.stderr
        shutil.rmtree(folder)
        _broken(saved_folders["digits-flux"], tmp_path, how)
        result = runner.invoke(main, ["calibrate", how, "16", *QUICK, "--json"])
        assert result.exit_code == 2, (how, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert json.loads(result.stdout) == {"error": result.stderr.split("error: ", 1)[1].strip(),
                                             "exit_code": 2}  # fmt: skip
    registry = open_registry(home)
    from registry.jobs import list_jobs

    assert list_jobs(registry) == [] and list(registry.store.list("jobs/")) == []


def test_models_add_refuses_an_unloadable_folder_and_registers_nothing(home, tmp_path,
                                                                    saved_folders):  # fmt: skip
    """The check calibrate makes before any worker, made when the folder is added (exit 2)."""
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {
        "no-weights": "component 'transformer' has no weights",
        "unknown-pipeline": "pipeline class 'NoSuchPipeline' is neither",
        "unknown-component": "invardiff.models.digits.NoSuchModule cannot be imported",
    }
    folders = {how: _broken(saved_folders["digits-flux"], tmp_path, how) for how in expected}
    folders["empty"] = empty
    expected["empty"] = "is not a diffusers pipeline directory (no model_index.json)"
    for how, folder in folders.items():
        added = runner.invoke(main, ["models", "add", how, str(folder), "--arch", "flux"])
        assert added.exit_code == 2, (how, added.stderr)
        assert expected[how] in added.stderr and len(added.stderr.strip().splitlines()) == 1
    listed = runner.invoke(main, ["models", "list", "--json"])
    assert {m["name"] for m in json.loads(listed.stdout)} == {m.name for m in BUILTIN_MODELS}
    good = runner.invoke(main, ["models", "add", "saved", str(saved_folders["digits-flux"]),
                                "--arch", "flux", "--pipeline", "DigitsFluxPipeline"])  # fmt: skip
    assert good.exit_code == 0, good.stderr


def test_jobs_list_shows_a_running_jobs_progress_and_eta(home):
    from registry.jobs import claim, heartbeat

    registry = open_registry(home)
    key = "cd" * 32
    claim(registry, key, "digits-flux", {}, "host:1:x", lease_seconds=60)
    progress = {"phase-1": {"total": 8, "computed": 8, "reused": 0, "done": 8, "eta_s": 0.0},
                "phase-2": {"total": 8, "computed": 3, "reused": 0, "done": 3, "eta_s": 12.4,
                            "updated_at": "2026-12-03T03:30:00Z"}}  # fmt: skip
    heartbeat(registry, key, "host:1:x", progress, 60)
    listed = CliRunner().invoke(main, ["jobs", "list"])
    assert listed.exit_code == 0, listed.stderr
    assert "phase-2 3/8, ETA 12 s at 2026-12-03T03:30:00Z" in listed.stdout
