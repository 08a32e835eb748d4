"""The first run of a new user: scripts/setup's environment and stamp, and the launcher that
refuses a shadowed ``registry`` package.

The set-up tests run the real scripts on a copy of scripts/ and pyproject.toml, with real
virtual environments whose pip is a stub that logs its calls (the real install is ~1.7 GB;
its end-to-end run on a fresh clone is measured by hand, see the README).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """import os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(f"{NAME} {sys.prefix} {' '.join(sys.argv[1:])}\\n")
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def stub_env(prefix: Path) -> Path:
    """A real virtual environment at ``prefix`` whose pip and pytest only log their calls."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    purelib = subprocess.run(
        [
            prefix / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for name in ("pip", "pytest"):
        package = Path(purelib) / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(f"NAME = {name!r}\n" + STUB)
    script = prefix / "bin" / "invardiff-registry"
    script.write_text(f"#!{prefix}/bin/python\nNAME = 'invardiff-registry'\n" + STUB)
    script.chmod(0o755)
    return prefix


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the scripts and pyproject.toml: all that scripts/setup reads."""
    copy = tmp_path / "p"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copy(ROOT / "pyproject.toml", copy)
    # The base interpreter the set-up makes .venv from: a real venv, with the stub pip.
    base = tmp_path / "base-python"
    base.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2 $3" = "-m venv --clear" ]; then exec {sys.executable} {__file__} "$4"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    base.chmod(0o755)
    return copy


def run(repo: Path, script: str = "setup", *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    environ.update(PYTHON=str(repo.parent / "base-python"), STUB_LOG=str(repo.parent / "calls"))
    environ.update(env)
    return subprocess.run(
        [repo / "scripts" / script, *args],
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def calls(repo: Path) -> list[str]:
    log = repo.parent / "calls"
    return log.read_text().splitlines() if log.exists() else []


def test_setup_makes_the_project_venv_and_skips_pip_while_the_stamp_matches(repo: Path):
    venv = repo / ".venv"
    first = run(repo)
    assert first.returncode == 0, first.stderr
    assert calls(repo) == [
        f"pip {venv} install -q torch==2.13.0",
        f"pip {venv} install -q -e .[dev]",
    ]
    assert f"installing into {venv}" in first.stderr
    stamp = (venv / ".invardiff-setup").read_text().split()
    version = subprocess.run(
        [venv / "bin" / "python", "-c", "import platform; print(platform.python_version())"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert stamp == [
        hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest(),
        version,
        str(repo),
    ]

    again = run(repo)
    assert again.returncode == 0 and again.stderr == "" and len(calls(repo)) == 2  # no pip

    with (repo / "pyproject.toml").open("a") as file:
        file.write("\n# a new dependency\n")
    failed = run(repo, STUB_EXIT="1")  # pip fails: no stamp, so the next run installs again
    assert failed.returncode != 0 and not (venv / ".invardiff-setup").exists()
    assert run(repo).returncode == 0
    assert calls(repo)[2:] == [  # the failed torch install, then both again
        f"pip {venv} install -q torch==2.13.0",
        f"pip {venv} install -q torch==2.13.0",
        f"pip {venv} install -q -e .[dev]",
    ]
    assert run(repo).returncode == 0 and len(calls(repo)) == 5


def test_an_active_virtual_environment_is_used_and_no_venv_is_made(repo: Path, tmp_path: Path):
    mine = stub_env(tmp_path / "mine")
    result = run(repo, VIRTUAL_ENV=str(mine))
    assert result.returncode == 0, result.stderr
    assert calls(repo) == [
        f"pip {mine} install -q torch==2.13.0",
        f"pip {mine} install -q -e .[dev]",
    ]
    assert (mine / ".invardiff-setup").exists() and not (repo / ".venv").exists()


def test_demo_and_test_run_inside_the_project_venv(repo: Path):
    assert run(repo).returncode == 0
    venv = repo / ".venv"
    tested = run(repo, "test", "-x", "tests/test_setup.py")
    assert tested.returncode == 0, tested.stderr
    assert calls(repo)[-1] == f"pytest {venv} -q -x tests/test_setup.py"
    demo = run(repo, "demo", "digits-dit", "--workers", "0")  # the real command would refuse it
    assert demo.returncode == 0, demo.stderr
    assert calls(repo)[-1] == (
        f"invardiff-registry {venv} calibrate digits-dit 16 --report out/digits-dit --workers 0"
    )
    assert len(calls(repo)) == 4  # set-up ran before each, without pip


def test_a_python_without_venv_support_gets_a_clear_error_and_no_venv(repo: Path):
    result = run(repo, PYTHON="false")
    assert result.returncode == 1
    assert "install python3-venv" in result.stderr.splitlines()[-1]
    assert not (repo / ".venv").exists() and calls(repo) == []


def test_a_shadowed_registry_package_is_refused_in_one_line(tmp_path: Path):
    launcher = [
        sys.executable,
        "-c",
        "import invardiff_registry; invardiff_registry.main()",
        "--help",
    ]
    ours = subprocess.run(
        launcher,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
    )
    assert ours.returncode == 0 and "Exit codes:" in ours.stdout

    (tmp_path / "registry.py").write_text("raise SystemExit('a user module, never imported')\n")
    shadowed = subprocess.run(
        launcher,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
    )
    assert shadowed.returncode == 1 and shadowed.stdout == ""
    assert shadowed.stderr.count("\n") == 1, shadowed.stderr  # one line, no traceback
    assert shadowed.stderr.startswith("invardiff-registry: error: 'import registry' finds ")
    assert str(tmp_path / "registry.py") in shadowed.stderr
    assert str(ROOT / "registry" / "__init__.py") in shadowed.stderr


if __name__ == "__main__":  # the stub base interpreter's `-m venv --clear DIR`
    stub_env(Path(sys.argv[1]))


def test_a_registry_package_of_another_distribution_is_named(tmp_path: Path):
    """Another distribution's ``registry`` package (its own dist-info) earlier on the path."""
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "__init__.py").write_text("")
    info = tmp_path / "other_tool-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-tool\nVersion: 1.0\n")
    (info / "RECORD").write_text("registry/__init__.py,,\n")
    result = subprocess.run(
        [sys.executable, "-c", "import invardiff_registry; invardiff_registry.main()", "list"],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "INVARDIFF_HOME": str(tmp_path)},
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"finds {tmp_path / 'registry' / '__init__.py'}" in result.stderr
    assert "also installed by other-tool: use a virtual environment without it" in result.stderr
