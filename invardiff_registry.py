"""The ``invardiff-registry`` command's entry point: first checks that the project's generic
top-level packages (``registry``, ``workers``, ``migrations``) are this project's own.

Another module of the same name earlier on ``sys.path`` (a ``registry.py`` in the folder a
script runs from, another distribution's ``registry`` package) would shadow them and end in a
traceback deep inside the command; this module, whose name is the project's, says so in one
line (exit 1). See docs/registry.md, "The package names".
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGES = ("registry", "workers", "migrations")
PROG = "invardiff-registry"


def shadowed_package() -> str | None:
    """What shadows one of :data:`PACKAGES`, as a one-line message; ``None`` when all are ours."""
    here = Path(__file__).resolve().parent
    for name in PACKAGES:
        expected = here / name / "__init__.py"
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
        if origin and Path(origin).resolve() == expected:
            continue
        if origin:
            found = origin
        elif spec is not None:
            found = f"a namespace package in {', '.join(spec.submodule_search_locations or [])}"
        else:
            found = "nothing"
        from importlib.metadata import packages_distributions  # only on this rare path

        others = sorted({d for d in packages_distributions().get(name, []) if d != "invardiff"})
        remedy = (
            f"also installed by {', '.join(others)}: use a virtual environment without it "
            "(scripts/setup makes one)"
            if others
            else "rename or move that module, or run from another folder"
        )
        return f"'import {name}' finds {found}, not this project's package ({expected}); {remedy}"
    return None


def main() -> None:
    """Run ``invardiff-registry`` (:data:`invardiff_cli.registry_app.registry_main`) once its packages
    are checked."""
    problem = shadowed_package()
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        sys.exit(1)
    from invardiff_cli.registry_app import registry_main

    registry_main(prog_name=PROG)


if __name__ == "__main__":
    main()
