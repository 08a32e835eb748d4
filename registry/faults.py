"""Crash points for the fault-injection tests (``tests/registry_tests/test_registry_faults.py``).

``INVARDIFF_FAULT=NAME:kill`` makes the process SIGKILL itself when it reaches crash point
NAME; ``NAME:stop`` makes it SIGSTOP itself there (the test resumes it with SIGCONT after
freezing a server). Unset, as in production, a crash point costs one dictionary lookup.
Points: ``publish.leased``, ``publish.stored``, ``publish.committed``, ``store.temp``,
``gc.claimed``, ``gc.deleted``.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Kill or stop this process here when ``INVARDIFF_FAULT`` names this point."""
    point, _, action = os.environ.get("INVARDIFF_FAULT", "").partition(":")
    if point == name:
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
