"""The code's layout rules: light import paths, and no private names imported across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("invardiff", "registry", "workers", "migrations")

# The command-line modules import private helpers of each other; the command layer
# (issue 16) replaces them. The lead empties this list when that work is merged.
ALLOWED = {
    ("registry/stale_cli.py", "registry.cli", "_emit"),
    ("registry/stale_cli.py", "registry.cli", "_registry"),
    ("workers/cli.py", "registry.cli", "_emit"),
    ("workers/cli.py", "registry.cli", "_log"),
    ("workers/cli.py", "registry.cli", "_registry"),
    ("workers/schedule_cli.py", "registry.cli", "_emit"),
    ("workers/schedule_cli.py", "registry.cli", "_log"),
    ("workers/schedule_cli.py", "registry.cli", "_registry"),
}


@pytest.mark.parametrize("module", ["registry.client", "workers.actors"])
def test_the_read_path_and_the_actors_import_no_sqlalchemy(module: str) -> None:
    """Fetching and the Ray actors stay light: neither SQLAlchemy nor the registry's write side."""
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy' "
        "or m in ('registry.service', 'registry.publishing', 'registry.aliases')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout[:300]


def private_imports(root: Path = ROOT) -> set[tuple[str, str, str]]:
    """``(file, module, name)`` of every ``from module import _name`` of another module."""
    found = set()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            own_package = relative.parent.parts
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                base = own_package[: len(own_package) - node.level + 1] if node.level else ()
                module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.add((relative.as_posix(), module, alias.name))
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports() - ALLOWED == set()


def test_the_private_import_check_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "a.py").write_text("from .jobs import _iso\nfrom .jobs import iso\n")
    (tmp_path / "registry" / "b.py").write_text("from registry.service import _user as user\n")
    assert private_imports(tmp_path) == {
        ("registry/a.py", "registry.jobs", "_iso"),
        ("registry/b.py", "registry.service", "_user"),
    }
