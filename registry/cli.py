"""``from registry.cli import main``: the ``invardiff-registry`` command group.

A shim kept for callers (and ``python -m registry``): the command line is assembled in the
top-level ``invardiff_cli`` package (:mod:`invardiff_cli.registry_app`), from the registry's, the
fleet's and the schedule's command modules. This upward import is allowed for this module
alone (tests/test_layout.py).
"""

from invardiff_cli.registry_app import registry_main as main

__all__ = ["main"]
