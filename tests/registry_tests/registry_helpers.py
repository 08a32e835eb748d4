"""Helpers shared by the registry tests (imported by conftest and the test modules)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL = ROOT / "reference" / "official-plans"
FLUX_PLANS = sorted(OFFICIAL.glob("flux_*.json"))
DIT_PLANS = sorted(OFFICIAL.glob("dit_*.json"))
FLUX_SOURCE = "hf://black-forest-labs/FLUX.1-dev"
POSTGRES = os.environ.get(
    "INVARDIFF_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def new_postgres_database(admin) -> str:
    """Create an empty uniquely named database; return its URL."""
    from sqlalchemy import text

    name = f"invardiff_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    return admin.url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin, url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))


@dataclass(frozen=True)
class Seaweed:
    """A running SeaweedFS S3 gateway with one bucket; tests isolate by key prefix.

    (Each SeaweedFS bucket is a collection that allocates its own volumes: one bucket per
    test would exhaust the volume slots of a small test server.)
    """

    endpoint: str
    bucket: str = "registry-tests"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **boto_credentials())

    def new_store_url(self) -> str:
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:16]}"


def boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def make_registry(config):
    from registry.service import Registry

    reg = Registry.open(config, create=True, check_schema=False)
    reg.init()
    reg.add_model("flux-dev", FLUX_SOURCE, "0123abc", "flux", {})
    return reg


def cli_env(config) -> dict[str, str]:
    """Environment variables that point the CLI at ``config``."""
    env = {"INVARDIFF_STORE_URL": config.store_url, "INVARDIFF_CACHE_DIR": str(config.cache_dir)}
    if config.database_url:
        env["INVARDIFF_DATABASE_URL"] = config.database_url
    if config.s3_endpoint_url:
        env["INVARDIFF_S3_ENDPOINT_URL"] = config.s3_endpoint_url
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``invardiff-registry`` in a real subprocess (``python -m registry``)."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "registry", *args],
        check=False,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def snapshot(config) -> dict:
    """Every row of every table, every store object's hash, every cache file."""
    from sqlalchemy import inspect, text

    from registry import db
    from registry.store import open_store

    state: dict = {}
    if config.database_url:
        engine = db.create(config.database_url)
        with engine.connect() as connection:
            for table in sorted(inspect(connection).get_table_names()):
                rows = connection.execute(text(f"SELECT * FROM {table}")).all()
                state[f"db:{table}"] = sorted(repr(tuple(r)) for r in rows)
        engine.dispose()
    store = open_store(config.store_url, config.s3_endpoint_url)
    state["store"] = sorted(
        (o.key, hashlib.sha256(store.get(o.key)).hexdigest()) for o in store.list("")
    )
    cache = Path(config.cache_dir)
    state["cache"] = (
        sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
    )
    return state


def calibration_record(**libraries: str) -> dict:
    from invardiff.calibration import CALIBRATOR_VERSION, CalibrationParams
    from workers.request import library_versions

    current = library_versions()
    return {
        "calibrator_version": CALIBRATOR_VERSION,
        "params": CalibrationParams.resolve("dit", "fast").to_json(),
        "trajectories": 2,
        "libraries": {"torch": current["torch"], "diffusers": current["diffusers"], **libraries},
    }


def digits_plan(tmp_path: Path, guidance: float, **libraries: str) -> Path:
    """A plan file for the built-in digits-dit with a calibration record (as `calibrate` makes)."""
    from invardiff import PlanTarget, all_compute_plan

    target = PlanTarget(
        model_id="digits-dit",
        pipeline="DiTPipeline",
        scheduler="DDIMScheduler",
        steps=50,
        height=16,
        width=16,
        guidance=guidance,
        dtype="float32",
    )
    plan = all_compute_plan(
        "dit", 50, {"attn": 8, "mlp": 8}, target=target, calibration=calibration_record(**libraries)
    )
    return plan.save(tmp_path / f"digits-{guidance}.json")


def publish_digits(
    registry, tmp_path: Path, guidance: float, status: str = "ready", **libraries: str
):
    """Publish :func:`digits_plan` for digits-dit (16x16) with ``status``."""
    from registry.matching import Resolution

    path = digits_plan(tmp_path, guidance, **libraries)
    return registry.publish(path, "digits-dit", Resolution.parse("16"), status=status)
