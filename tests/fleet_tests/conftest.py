"""Fixtures for the fleet tests: one real local Ray per session, fresh embedded registries.

Ray 2.60 turns token authentication on for local clusters, so ``RAY_AUTH_MODE`` is set
explicitly (for this process, the actors, and the driver subprocesses that join the cluster).
The Hugging Face cache is a session folder set before Ray starts, so that actors see it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import RAY_ENV, open_registry


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The GCS address of this session's local Ray (2 CPUs)."""
    os.environ.update(RAY_ENV, HF_HUB_CACHE=str(tmp_path_factory.mktemp("hf-cache")))
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded registry home (SQLite + local store), initialized."""
    for name in ("INVARDIFF_DATABASE_URL", "INVARDIFF_STORE_URL", "RAY_ADDRESS", "INVARDIFF_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INVARDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("INVARDIFF_CACHE_DIR", str(tmp_path / "cache"))
    open_registry(tmp_path / "home", create=True).init()
    return tmp_path / "home"
