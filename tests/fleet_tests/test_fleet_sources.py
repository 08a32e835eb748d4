"""Checkpoint sources beyond the built-ins: a diffusers folder and ``hf://`` from the local
Hugging Face cache (offline), with a prompt file, on a tiny random-weight FluxPipeline."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from fleet_helpers import open_registry

from registry.cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"
ALIAS = ["--arch", "flux", "--pipeline", "FluxPipeline", "--resolution", "32", "--steps", "4",
         "--guidance", "3.5", "--dtype", "float32"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from invardiff.models import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


def test_hf_snapshot_with_a_prompt_file_and_clear_errors(
    ray_address, home, tmp_path, tiny_flux_dir
):
    import os

    snapshot = os.path.join(
        os.environ["HF_HUB_CACHE"], "models--org--tiny-flux", "snapshots", REVISION
    )
    shutil.copytree(tiny_flux_dir, snapshot, dirs_exist_ok=True)
    runner = CliRunner()
    for name, source, revision in [("tiny-flux", "hf://org/tiny-flux", REVISION),
                                   ("tiny-flux-old", "hf://org/tiny-flux", "f" * 40),
                                   ("tiny-flux-dir", str(tiny_flux_dir), None)]:  # fmt: skip
        extra = ["--revision", revision] if revision else []
        assert runner.invoke(main, ["models", "add", name, source, *extra, *ALIAS]).exit_code == 0

    missing = runner.invoke(main, ["calibrate", "tiny-flux-old", "32"])
    assert missing.exit_code == 3 and f"at revision {'f' * 40}" in missing.stderr
    odd = runner.invoke(main, ["calibrate", "tiny-flux-dir", "30"])
    assert odd.exit_code == 2 and "divisible by 4" in odd.stderr
    nofile = runner.invoke(
        main, ["calibrate", "tiny-flux-dir", "32", "--prompts", str(tmp_path / "x")]
    )
    assert nofile.exit_code == 2 and "does not exist" in nofile.stderr
    assert list(open_registry(home).store.list("jobs/")) == []

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na blue car\n")
    args = ["calibrate", "tiny-flux", "32", "--prompts", str(prompts), "--trajectories", "2",
            "--workers", "1", "--validate", "2", "--repeats", "1", "--json"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["created"] and data["target"]["revision"] == REVISION
    assert (
        data["target"]["pipeline"] == "FluxPipeline"
        and data["metrics"]["validation"]["samples"] == 2
    )
    expected = hashlib.sha256(b'["a red apple","a blue car"]').hexdigest()
    shown = json.loads(runner.invoke(main, ["jobs", "show", data["job_key"], "--json"]).stdout)
    assert shown["request"]["prompts_sha256"] == expected
    assert shown["request"]["prompts"] == ["a red apple", "a blue car"]  # once, not per call
    assert [c["prompt_index"] for c in shown["request"]["calls"]] == [0, 1]
    version = json.loads(runner.invoke(main, ["show", data["sha256"], "--json"]).stdout)
    assert version["lineage"]["calibration"]["prompts_sha256"] == expected
