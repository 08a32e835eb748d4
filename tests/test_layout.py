"""The code's layout rules, read from the source tree: light import paths, no private names
imported across modules, and imports one way: engine <- registry <- fleet <- commands.

``invardiff/`` imports none of ``registry``, ``workers``, ``invardiff_cli``; ``registry/`` none
of ``workers``, ``invardiff_cli``; ``workers/`` not ``invardiff_cli``. Imports by name from a
string (``importlib.import_module("workers.driver")``) count too. The only exceptions are the
shims in :data:`SHIMS`, which hand ``python -m PACKAGE`` and old import paths to the command layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("invardiff", "registry", "workers", "migrations", "invardiff_cli")


BELOW = {  # package -> the packages above it, which it must not import
    "invardiff": {"registry", "workers", "invardiff_cli"},
    "registry": {"workers", "invardiff_cli"},
    "workers": {"invardiff_cli"},
}
SHIMS = {  # file -> the upper package it may import (a thin hand-over to the command layer)
    "invardiff/__main__.py": "invardiff_cli",  # python -m invardiff
    "invardiff/cli.py": "invardiff_cli",  # python -m invardiff.cli; invardiff.cli.main
    "registry/__main__.py": "invardiff_cli",  # python -m registry
    "registry/cli.py": "invardiff_cli",  # from registry.cli import main
}


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every absolute import, also by name from a string."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value.split(".")[0].split(":")[0]))
    return found


def upward_imports(root: Path) -> list[str]:
    """``file:line imports PACKAGE`` for every import against the layers' direction."""
    problems = []
    for package, above in BELOW.items():
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            for line, imported in imported_packages(ast.parse(path.read_text(), name)):
                if imported in above and SHIMS.get(name) != imported:
                    problems.append(f"{name}:{line} imports {imported}")
    return problems


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
    assert private_imports() == set()


def test_the_private_import_check_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "a.py").write_text("from .jobs import _iso\nfrom .jobs import iso\n")
    (tmp_path / "registry" / "b.py").write_text("from registry.service import _user as user\n")
    assert private_imports(tmp_path) == {
        ("registry/a.py", "registry.jobs", "_iso"),
        ("registry/b.py", "registry.service", "_user"),
    }


def test_imports_go_one_way():
    assert upward_imports(ROOT) == []


def test_an_upward_import_is_found(tmp_path: Path):
    for package in (*BELOW, "invardiff_cli"):
        (tmp_path / package).mkdir()
    (tmp_path / "registry" / "cli.py").write_text("from invardiff_cli.registry_app import main\n")
    (tmp_path / "registry" / "jobs.py").write_text(
        "import os\n\ndef f():\n    import workers.driver\n"
    )
    (tmp_path / "workers" / "pool.py").write_text(
        "import importlib\nimportlib.import_module('invardiff_cli.fleet_commands')\n"
    )
    (tmp_path / "invardiff" / "plan.py").write_text("from registry.matching import Query\n")
    assert upward_imports(tmp_path) == [
        "invardiff/plan.py:1 imports registry",
        "registry/jobs.py:4 imports workers",
        "workers/pool.py:2 imports invardiff_cli",
    ]  # registry/cli.py is an allowed shim
