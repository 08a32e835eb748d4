"""Checks of the run options (:class:`workers.driver.RunOptions`) before anything starts.

Limits documented in docs/fleet.md ("Input limits"); a value out of range is
:class:`~registry.errors.InvalidInput` (exit 2). Light: the CLI calls :func:`check_options`
before it opens the registry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from registry.errors import InvalidInput
from registry.validation import shown

if TYPE_CHECKING:
    from .driver import RunOptions

MAX_WORKERS = 1024
MAX_WORKER_CPUS = 1024.0
MAX_LEASE_SECONDS = 86_400.0
MAX_GATE = 1000.0  # --min-psnr (dB) and --min-speedup (x)


def check_options(options: RunOptions) -> None:
    """Refuse run options out of their documented range (:class:`InvalidInput`, exit 2).

    Checked before any worker starts: worker count and CPUs, lease, gate thresholds, the
    Ray address's syntax and the report folder (which must be creatable and writable).
    """
    if options.workers is not None:
        _check_range(options.workers, "--workers", 1, MAX_WORKERS)
    _check_range(options.cpus_per_worker, "--worker-cpus", 0.01, MAX_WORKER_CPUS)
    _check_range(options.lease_seconds, "the job lease (INVARDIFF_JOB_LEASE_S)", 0.1,
                 MAX_LEASE_SECONDS)  # fmt: skip
    for name, value in (("--min-psnr", options.min_psnr), ("--min-speedup", options.min_speedup)):
        if value is not None:
            _check_range(value, name, 0.0, MAX_GATE)
    check_ray_address(options.ray_address or os.environ.get("RAY_ADDRESS") or None)
    if options.report is not None:
        check_report_folder(options.report)


def _check_range(value: float, what: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidInput(f"{what} must be between {low:g} and {high:g}, got {value!r}")


def check_ray_address(address: str | None) -> None:
    """``auto``, ``local``, ``HOST:PORT`` or ``ray|http|https://HOST[:PORT]`` (port 1..65535)."""
    if address is None or address in ("auto", "local"):
        return
    parsed = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if (
        parsed.scheme not in ("ray", "http", "https")
        or not parsed.hostname
        or port == -1
        or ("://" not in address and port is None)
        or any(c.isspace() or not c.isprintable() for c in address)
    ):
        raise InvalidInput(
            f"--ray-address {shown(address)}: expected auto, HOST:PORT or ray://HOST:PORT"
        )


def check_report_folder(folder: Path) -> None:
    """A report folder must be a folder (or creatable) where files can be written.

    Checked by creating it and a probe file, both removed again: nothing is left behind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidInput(f"--report {folder}: exists and is not a folder")
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InvalidInput(
            f"--report {folder}: cannot write there ({exc.strerror or exc})"
        ) from None
    finally:
        for path in reversed(created):
            path.rmdir()
