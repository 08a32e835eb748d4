"""SIGINT and SIGTERM of a calibration driver: one line and exit 130 / 143, the job failed.

Starting Ray installs its own SIGTERM handler, which aborts with a C++ stack (exit 134); the
driver replaces it (and Python's KeyboardInterrupt) with :func:`trap_signals` once Ray runs.
A signal is only noted: raising inside Ray's C++ calls would surface as a SystemError, so
the driver's next tick (at most about 2 s later) raises :class:`Interrupted`, the job is
marked failed, and a rerun resumes from the stored shards. A second signal raises at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from registry.errors import RegistryError

_SIGNALLED: list[int] = []  # signals received since trap_signals, checked at every tick


class Interrupted(RegistryError):
    """The driver got SIGINT or SIGTERM: the job is marked failed and a rerun resumes it.

    Exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports.
    """

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; the job is marked failed, rerun to resume")
        self.exit_code = 128 + signum


def _note_signal(signum: int, frame: object) -> None:
    _SIGNALLED.append(signum)
    if len(_SIGNALLED) > 1:
        raise Interrupted(signum)


def check_signals() -> None:
    """Raise :class:`Interrupted` if SIGINT or SIGTERM arrived since :func:`trap_signals`."""
    if _SIGNALLED:
        raise Interrupted(_SIGNALLED[0])


def trap_signals() -> dict[int, Any]:
    """Note SIGINT and SIGTERM for :func:`check_signals` (main thread only); return the
    previous handlers for :func:`restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _note_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`trap_signals` replaced and forget received signals."""
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    _SIGNALLED.clear()
