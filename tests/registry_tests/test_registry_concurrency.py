"""Races against real servers: SeaweedFS plus SQLite or PostgreSQL, several processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from registry_helpers import FLUX_PLANS, ROOT, cli_env, make_registry

from registry.errors import Conflict
from registry.matching import Resolution
from registry.service import Registry

WORKERS = 8


@pytest.fixture
def s3_config(config, seaweed, seaweed_store):
    """The parametrized database with a SeaweedFS store."""
    return replace(config, store_url=seaweed_store, s3_endpoint_url=seaweed.endpoint)


def _race(target, *args) -> list:
    """Run ``target(barrier, *args)`` in WORKERS processes released at once; their results."""
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(WORKERS), context.Queue()
    processes = [
        context.Process(target=_run, args=(target, barrier, queue, *args)) for _ in range(WORKERS)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return results


def _run(target, barrier, queue, *args) -> None:
    try:
        queue.put(target(barrier, *args))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", type(exc).__name__, str(exc)))


def _publish(barrier, config, path: Path):
    registry = Registry.open(config)
    barrier.wait()
    result = registry.publish(path, "flux-dev", Resolution.parse("1024"))
    return ("ok", result.created, result.version.version, result.version.sha256)


def _promote(barrier, config, sha256: str):
    registry = Registry.open(config)
    barrier.wait()
    try:
        return ("ok", registry.promote(sha256, "production", expect=1)["lock_version"])
    except Conflict:
        return ("conflict",)


def test_eight_processes_publishing_the_same_plan_make_one_version(s3_config):
    registry = make_registry(s3_config)
    results = _race(_publish, s3_config, FLUX_PLANS[0])
    assert all(r[0] == "ok" for r in results), results
    assert sorted(r[1] for r in results) == [False] * (WORKERS - 1) + [True]
    assert {(r[2], r[3]) for r in results} == {(1, results[0][3])}
    rows = registry.versions()
    assert [(r["version"], r["sha256"]) for r in rows] == [(1, results[0][3])]
    assert [o.key for o in registry.store.list("plans/")] == [rows[0]["object_key"]]
    assert registry.verify()["ok"] == 1


def test_concurrent_alias_moves_from_the_same_read_let_exactly_one_win(s3_config):
    registry = make_registry(s3_config)
    shas = [
        registry.publish(p, "flux-dev", Resolution.parse("1024")).version.sha256
        for p in FLUX_PLANS[:2]
    ]
    registry.promote(shas[0], "production")  # lock version 1: what every racer read
    results = _race(_promote, s3_config, shas[1])
    assert sorted(results) == [("conflict",)] * (WORKERS - 1) + [("ok", 2)], results
    assert registry.show(shas[1])["aliases"] == {"production": 2}


@pytest.mark.parametrize(
    "database_url", ["sqlite"], indirect=True
)  # the race is in cache and store
def test_concurrent_fetches_of_one_plan_all_succeed(s3_config, tmp_path: Path):
    registry = make_registry(s3_config)
    expected = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024")).version.sha256
    env = {**cli_env(s3_config), "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "registry", "fetch", "flux-dev", "1024", "--json"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(WORKERS)
    ]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0] * WORKERS, [err for _, err in outputs]
    documents = [json.loads(out) for out, _ in outputs]
    assert {d["sha256"] for d in documents} == {expected}
    assert len({d["path"] for d in documents}) == 1
    path = Path(documents[0]["path"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected
    assert not [p for p in Path(s3_config.cache_dir).rglob(".tmp-*")]  # no partial files left
