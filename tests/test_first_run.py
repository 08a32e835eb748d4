"""A new user's first steps after the main job: the README's Python quick start
(examples/quickstart.py) on a published plan, and where ``fetch`` caches it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from registry.config import Config

ROOT = Path(__file__).resolve().parents[1]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with only INVARDIFF_HOME set, and a home folder of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVARDIFF_", "XDG_"))}
    env.update(INVARDIFF_HOME=str(tmp_path / "invardiff"), HOME=str(tmp_path / "user"))
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, check=False, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_the_quick_start_runs_on_the_published_plan_and_caches_under_home(tmp_path: Path):
    env = clean_env(tmp_path)
    plan_file = tmp_path / "plan.json"  # a small, fast calibration stands in for scripts/demo's
    run(env, "-m", "invardiff.cli", "calibrate", "--model", "digits-flux", "--trajectories", "1",
        "--preset", "fast", "--out", str(plan_file))  # fmt: skip
    run(env, "-m", "registry", "init")
    published = run(env, "-m", "registry", "publish", str(plan_file), "--model", "digits-flux",
                    "--resolution", "16")  # fmt: skip
    sha256 = published.stdout.split()[-1]

    result = run(env, "examples/quickstart.py")
    summary = result.stdout.splitlines()[-1]
    match = re.fullmatch(
        r"digits-flux: speed-up (\d+\.\d\d)x, PSNR (\d+\.\d) dB \(cached vs full, 10 digits\)", summary
    )
    assert match, summary
    assert float(match[1]) > 1.0 and 20 < float(match[2]) < 100
    assert f"sha256={sha256[:12]}" in result.stdout  # the published plan, not another
    home = tmp_path / "invardiff"
    assert (home / "cache" / "blobs" / "sha256" / f"{sha256}.json").is_file()
    assert not (tmp_path / "user").exists()  # nothing under ~ (no ~/.cache/invardiff)


def test_the_cache_lives_under_invardiff_home_unless_set(tmp_path: Path):
    home = tmp_path / "h"
    assert Config.from_env(env={"INVARDIFF_HOME": str(home)}).cache_dir == home / "cache"
    env = {"INVARDIFF_HOME": str(home), "INVARDIFF_CACHE_DIR": str(tmp_path / "c")}
    assert Config.from_env(env=env).cache_dir == tmp_path / "c"
    assert Config.from_env(cache_dir=tmp_path / "flag", env=env).cache_dir == tmp_path / "flag"
    store_only = {"INVARDIFF_HOME": str(home), "INVARDIFF_STORE_URL": str(tmp_path / "store")}
    assert Config.from_env(env=store_only).cache_dir == home / "cache"


def test_the_readme_quick_start_is_the_example():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start (Python)\n", 1)[1]
    block = section.split("```python\n", 1)[1].split("```\n", 1)[0]
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert block == example.split('"""\n\n', 1)[1]  # the example without its docstring
