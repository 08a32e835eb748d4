"""Fault injection on the real backends: kill -9 at each step of publish and gc, gc racing
publish, servers that stop answering, tampered indexes and cache refs, damaged objects.

Crash points are ``INVARDIFF_FAULT=<point>:kill|stop`` (registry/faults.py); commands run in
forked processes (no interpreter start-up) or, where the exit code matters, the real CLI.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from click.testing import CliRunner
from fault_helpers import FreezableProxy, forked, plan_variants, silent_server, wait_stopped
from registry_helpers import FLUX_PLANS, cli_env, make_registry, run_cli

from registry import errors
from registry.cli import main
from registry.matching import Resolution
from registry.service import Registry
from registry.store import blob_key, put_blob

R1024 = Resolution.parse("1024")
BACKENDS = pytest.mark.parametrize(
    ("database_url", "store_kind"),
    [("sqlite", "local"), ("postgresql", "seaweed")],
    indirect=["database_url"],
)


@pytest.fixture
def store_kind() -> str:
    return "local"


@pytest.fixture
def cfg(config, store_kind, request):
    """``config`` with a local store or a fresh SeaweedFS prefix."""
    if store_kind == "local":
        return config
    seaweed = request.getfixturevalue("seaweed")
    return replace(
        config, store_url=request.getfixturevalue("seaweed_store"), s3_endpoint_url=seaweed.endpoint
    )


@pytest.fixture
def cli(cfg, monkeypatch):
    """The CLI in-process (click's runner) against ``cfg``."""
    for name, value in cli_env(cfg).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def _publish(config, path: Path, resolution: Resolution = R1024):
    return Registry.open(config).publish(path, "flux-dev", resolution).version.version


def _gc(config):
    return Registry.open(config).gc(timedelta(0))["deleted"]


def _missing_or_corrupt(registry: Registry) -> list:
    return [f for f in registry.verify()["failures"] if f["problem"] in ("missing", "corrupt")]


def _finish(process, queue, timeout: float = 120):
    result = queue.get(timeout=timeout)
    process.join(timeout=30)
    return result


# ---- 2: gc racing publish ---------------------------------------------------------------
@pytest.mark.parametrize("store_kind", ["local", "seaweed"])
def test_publish_racing_gc_never_loses_a_committed_object(cfg, tmp_path: Path):
    """Publish an old orphan's bytes while gc (--min-age 0) runs, many times: the committed
    version's object must survive every trial (6 of 16 trials lost it on S3 before)."""
    registry = make_registry(cfg)
    trials = plan_variants(tmp_path, 8)
    for number, (path, data) in enumerate(trials):
        put_blob(registry.store, data)  # the orphan a failed publish left behind
        gc = forked(lambda: (time.sleep(random.uniform(0, 0.05)), _gc(cfg))[1])
        publisher = forked(_publish, cfg, path)
        assert _finish(*publisher) == ("ok", number + 1)
        assert _finish(*gc)[0] == "ok"
        assert _missing_or_corrupt(registry) == [], f"trial {number}"
    assert registry.verify()["failures"] == []


@BACKENDS
def test_gc_leaves_an_object_a_publish_has_written_but_not_committed(cfg, tmp_path: Path):
    registry = make_registry(cfg)
    [(path, data)] = plan_variants(tmp_path, 1)
    put_blob(registry.store, data)
    publisher = forked(_publish, cfg, path, env={"INVARDIFF_FAULT": "publish.stored:stop"})
    wait_stopped(publisher[0].pid)  # written (found there), not yet committed
    assert registry.gc(timedelta(0))["deleted"] == []
    os.kill(publisher[0].pid, signal.SIGCONT)
    assert _finish(*publisher) == ("ok", 1)
    assert registry.verify()["failures"] == []


@BACKENDS
def test_publish_waits_for_a_gc_that_is_deleting_its_object(cfg, tmp_path: Path):
    registry = make_registry(cfg)
    [(path, data)] = plan_variants(tmp_path, 1)
    ref = put_blob(registry.store, data)
    gc = forked(_gc, cfg, env={"INVARDIFF_FAULT": "gc.claimed:stop"})
    wait_stopped(gc[0].pid)  # gc decided to delete the orphan, has not yet
    publisher = forked(_publish, cfg, path)
    time.sleep(1.5)
    assert publisher[0].is_alive(), "the publish must wait for gc's delete"
    os.kill(gc[0].pid, signal.SIGCONT)
    assert _finish(*gc) == ("ok", [ref.key])
    assert _finish(*publisher) == ("ok", 1)  # written again after gc's delete
    assert registry.verify()["failures"] == []


# ---- kill -9 at each step of publish and gc ----------------------------------------------
PUBLISH_POINTS = ["publish.leased", "store.temp", "publish.stored", "publish.committed"]


@pytest.mark.parametrize(
    ("database_url", "store_kind", "point"),
    [
        *(("sqlite", "local", point) for point in PUBLISH_POINTS),
        # an S3 PUT is all or nothing: no temporary file
        *(("postgresql", "seaweed", p) for p in PUBLISH_POINTS if p != "store.temp"),
    ],
    indirect=["database_url"],
)
def test_publish_killed_at_each_step_loses_nothing(cfg, point, tmp_path: Path):
    registry = make_registry(cfg)
    [(path, _)] = plan_variants(tmp_path, 1)
    process, _ = forked(_publish, cfg, path, env={"INVARDIFF_FAULT": f"{point}:kill"})
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    committed = point == "publish.committed"
    assert len(registry.versions("flux-dev")) == int(committed)
    report = registry.verify()
    stale = [{"object_key": "index/flux-dev.json", "problem": "stale index"}]
    assert report["failures"] == (stale if committed else [])
    assert registry.gc(timedelta(0))["deleted"] == []  # referenced, or leased by the killed one
    assert registry.publish(path, "flux-dev", R1024).created is not committed  # runs again
    assert registry.verify()["failures"] == []
    assert registry.gc(timedelta(0))["deleted"] == []
    assert [o.key for o in registry.store.list("plans/")] == [registry.versions()[0]["object_key"]]


@BACKENDS
@pytest.mark.parametrize("point", ["gc.claimed", "gc.deleted"])
def test_gc_killed_at_each_step_loses_nothing(cfg, point, tmp_path: Path, monkeypatch):
    registry = make_registry(cfg)
    (kept, _), (path, data) = plan_variants(tmp_path, 2)
    registry.publish(kept, "flux-dev", R1024)
    orphan = put_blob(registry.store, data)
    process, _ = forked(_gc, cfg, env={"INVARDIFF_FAULT": f"{point}:kill"})
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    assert registry.verify()["failures"] == []
    left = [o.key for o in registry.store.list("plans/")]
    assert (orphan.key in left) is (point == "gc.claimed")
    monkeypatch.setenv("INVARDIFF_LEASE_TTL", "2")  # the killed gc's lease expires
    started = time.monotonic()
    assert registry.publish(path, "flux-dev", R1024).version.version == 2
    assert time.monotonic() - started < 30
    assert registry.gc(timedelta(0))["deleted"] == []
    assert registry.verify()["failures"] == []


# ---- 3: publish over a damaged object -----------------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("store_kind", ["local", "seaweed"])
def test_publish_replaces_a_damaged_object(cfg, cli, tmp_path: Path):
    registry = make_registry(cfg)
    (first, data), (second, other) = plan_variants(tmp_path, 2)
    registry.store.put(blob_key(put_blob(registry.store, data).sha256), b"damaged")
    assert registry.publish(first, "flux-dev", R1024).created
    assert registry.verify()["failures"] == []
    published = registry.publish(second, "flux-dev", R1024).version
    registry.store.put(published.object_key, other[:-1] + b" ")  # a committed one, damaged
    assert cli("fetch", "flux-dev", "1024").exit_code == errors.INTEGRITY
    assert registry.publish(second, "flux-dev", R1024).created is False  # ... is repaired
    assert registry.verify()["failures"] == []
    assert cli("fetch", "flux-dev", "1024").exit_code == 0


# ---- 7, 13: untrusted indexes and cache refs ---------------------------------------------
def _edit_index(store, edit) -> None:
    document = json.loads(store.get("index/flux-dev.json"))
    edit(document)
    store.put("index/flux-dev.json", json.dumps(document).encode())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tampered_index_is_an_integrity_failure_and_writes_nothing(cfg, cli, tmp_path: Path):
    registry = make_registry(cfg)
    registry.publish(FLUX_PLANS[0], "flux-dev", R1024)
    other = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("512")).version
    pristine = registry.store.get("index/flux-dev.json")
    dest, outside = tmp_path / "out" / "in", tmp_path / "escaped"
    fetch = ("fetch", "flux-dev", "1024", "--index", "--refresh", "--dest", str(dest))

    def escape(document):
        document["model"]["name"] = f"../../escaped/{'x' * 8}"

    def other_plan(document):  # the 1024 target's version now names the 512 plan
        version = document["targets"][0]["versions"][0]
        version.update(sha256=other.sha256, size=other.size, object_key=other.object_key)

    def other_key(document):
        document["targets"][0]["versions"][0]["object_key"] = other.object_key

    for edit in (escape, other_plan, other_key):
        registry.store.put("index/flux-dev.json", pristine)
        _edit_index(registry.store, edit)
        result = cli(*fetch)
        assert result.exit_code == errors.INTEGRITY, (edit.__name__, result.stderr)
        assert not outside.exists() and not dest.exists(), edit.__name__
    registry.store.put("index/flux-dev.json", pristine)
    assert cli(*fetch).exit_code == 0 and [p.name for p in dest.iterdir()] == [
        "flux-dev_1024x1024_28steps_v1.json"
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tampered_cache_refs_are_cache_misses(cfg, cli, tmp_path: Path):
    registry = make_registry(cfg)
    good = registry.publish(FLUX_PLANS[0], "flux-dev", R1024).version
    registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("512"))
    assert cli("fetch", "flux-dev", "512").exit_code == 0  # another plan in the cache
    assert cli("fetch", "flux-dev", "1024").exit_code == 0
    refs = {}
    for ref in (Path(cfg.cache_dir) / "refs").iterdir():
        refs[json.loads(ref.read_text())["target"]["width"]] = ref
    dest, outside = tmp_path / "out" / "in", tmp_path / "escaped"
    record = json.loads(refs[1024].read_text())
    other = json.loads(refs[512].read_text())
    edits = {
        "another cached plan": {**record, "sha256": other["sha256"], "size": other["size"]},
        "crafted model": {**record, "model": "../../escaped/x"},
        "missing key": {k: v for k, v in record.items() if k != "target"},
        "sha256 as a path": {**record, "sha256": "../../../escaped"},
        "not an object": [],
    }
    for what, edited in edits.items():
        refs[1024].write_text(json.dumps(edited))
        result = cli("fetch", "flux-dev", "1024", "--dest", str(dest), "--json")
        assert result.exit_code == 0, (what, result.stderr)
        answer = json.loads(result.stdout)
        assert (answer["sha256"], answer["cached"]) == (good.sha256, False), what
        assert Path(answer["path"]).parent == dest and not outside.exists(), what


# ---- 11: indexes checked against the database, and rebuilt --------------------------------
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_stale_or_lost_indexes_are_found_by_verify_and_rebuilt(cfg, cli, tmp_path: Path):
    registry = make_registry(cfg)
    [(path, _)] = plan_variants(tmp_path, 1)
    process, _ = forked(_publish, cfg, path, env={"INVARDIFF_FAULT": "publish.committed:kill"})
    process.join(timeout=120)  # committed, index not written
    assert cli("fetch", "flux-dev", "1024", "--index").exit_code == errors.NOT_FOUND
    result = cli("verify")
    assert (
        result.exit_code == errors.INTEGRITY and "stale index: index/flux-dev.json" in result.stdout
    )
    rebuilt = json.loads(cli("index", "rebuild", "--json").stdout)
    assert rebuilt["rewritten"] == ["index/flux-dev.json"] and rebuilt["checked"] == 4
    assert cli("verify").exit_code == 0
    assert cli("fetch", "flux-dev", "1024", "--index").exit_code == 0
    for index in list(registry.store.list("index/")):  # the store lost its indexes
        registry.store.delete(index.key)
    report = json.loads(cli("verify", "--json").stdout)
    assert {f["problem"] for f in report["failures"]} == {"missing index"}
    assert len(report["failures"]) == 4
    assert json.loads(cli("index", "rebuild", "--json").stdout)["checked"] == 4
    assert cli("verify").exit_code == 0


# ---- 12: temporary files of killed writers ------------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_gc_removes_old_temporary_files_of_killed_writers(cfg, tmp_path: Path):
    registry = make_registry(cfg)
    [(path, _)] = plan_variants(tmp_path, 1)
    process, _ = forked(_publish, cfg, path, env={"INVARDIFF_FAULT": "store.temp:kill"})
    process.join(timeout=120)
    temporaries = list(Path(cfg.store_url).rglob(".tmp-*"))
    assert len(temporaries) == 1
    assert registry.gc(timedelta(hours=1))["temporaries"] == []  # may be a live writer's
    old = time.time() - 7200
    os.utime(temporaries[0], (old, old))
    assert registry.gc(timedelta(hours=1), dry_run=True)["temporaries"] != []
    assert temporaries[0].exists()
    report = registry.gc(timedelta(hours=1))
    assert len(report["temporaries"]) == 1 and not temporaries[0].exists()


# ---- 16: files respect the umask ---------------------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_store_and_cache_files_respect_the_umask(cfg, cli):
    previous = os.umask(0o022)
    try:
        registry = make_registry(cfg)
        registry.publish(FLUX_PLANS[0], "flux-dev", R1024)
        fetched = json.loads(cli("fetch", "flux-dev", "1024", "--json").stdout)
    finally:
        os.umask(previous)
    files = [p for p in Path(cfg.store_url).rglob("*") if p.is_file()]
    files += [p for p in Path(cfg.cache_dir).rglob("*") if p.is_file()]
    assert Path(fetched["path"]) in files and len(files) >= 6
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}


# ---- minor: a missing object is an integrity failure -------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_missing_object_exits_4(cfg, cli):
    registry = make_registry(cfg)
    registry.store.delete(registry.publish(FLUX_PLANS[0], "flux-dev", R1024).version.object_key)
    for args in (["fetch", "flux-dev", "1024"], ["fetch", "flux-dev", "1024", "--index"]):
        result = cli(*args)
        assert result.exit_code == errors.INTEGRITY and "is missing" in result.stderr, args


# ---- 14: a database that stops answering -------------------------------------------------
def _cli_within(seconds: float, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI; it must finish within ``seconds`` (plus the interpreter's start-up)."""
    started = time.monotonic()
    result = run_cli(*args, env={**env, "INVARDIFF_DB_TIMEOUT": "2"}, timeout=seconds + 30)
    assert time.monotonic() - started < seconds + 10, (args, result.stderr)
    return result


def test_a_database_server_that_never_answers_is_exit_5(tmp_path: Path):
    with silent_server() as port:
        env = {
            "INVARDIFF_DATABASE_URL": f"postgresql://u@127.0.0.1:{port}/db",
            "INVARDIFF_STORE_URL": str(tmp_path / "store"),
        }
        result = _cli_within(4, "list", env=env)
    assert result.returncode == errors.UNREACHABLE, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_locked_postgresql_table_is_exit_5_in_bounded_time(cfg):
    from sqlalchemy import create_engine, text

    make_registry(cfg)
    engine = create_engine(cfg.database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as holder:
        holder.execute(text("LOCK TABLE model_aliases IN ACCESS EXCLUSIVE MODE"))  # held open
        result = _cli_within(4, "list", env=cli_env(cfg))
        holder.rollback()
    engine.dispose()
    assert result.returncode == errors.UNREACHABLE, result.stderr
    assert "cannot reach database" in result.stderr and "timeout" in result.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_locked_sqlite_database_is_exit_5_in_bounded_time(cfg):
    from sqlalchemy.engine import make_url

    make_registry(cfg)
    holder = sqlite3.connect(make_url(cfg.database_url).database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = _cli_within(4, "list", env=cli_env(cfg))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == errors.UNREACHABLE and "database is locked" in result.stderr


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_database_that_hangs_mid_command_is_exit_5_in_bounded_time(cfg, tmp_path, monkeypatch):
    """A publish whose PostgreSQL connection stops answering between two transactions."""
    from sqlalchemy.engine import make_url

    make_registry(cfg)
    url = make_url(cfg.database_url)
    proxy = FreezableProxy(url.port or 5432)
    proxied = replace(cfg, database_url=url.set(port=proxy.port).render_as_string(False))
    [(path, _)] = plan_variants(tmp_path, 1)
    env = {"INVARDIFF_FAULT": "publish.stored:stop", "INVARDIFF_DB_TIMEOUT": "2"}
    try:
        publisher = forked(_publish, proxied, path, env=env)
        wait_stopped(publisher[0].pid)
        proxy.freeze()
        started = time.monotonic()
        os.kill(publisher[0].pid, signal.SIGCONT)
        result = _finish(*publisher, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert result[:2] == ("error", errors.UNREACHABLE), result
    assert "did not answer within 3 s" in result[2] and elapsed < 20, (result, elapsed)


# ---- 15: an S3 server that stops answering -----------------------------------------------
@pytest.fixture
def frozen_s3(seaweed, seaweed_store):
    """A SeaweedFS prefix reached through a freezable proxy: (store URL, proxy)."""
    proxy = FreezableProxy(urlparse(seaweed.endpoint).port)
    yield seaweed_store, proxy
    proxy.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_hanging_s3_server_fails_a_cold_fetch_in_bounded_time(config, frozen_s3):
    store_url, proxy = frozen_s3
    s3 = replace(config, store_url=store_url, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    make_registry(s3).publish(FLUX_PLANS[0], "flux-dev", R1024)
    proxy.freeze()
    env = {**cli_env(s3), "INVARDIFF_S3_TIMEOUT": "1", "INVARDIFF_S3_ATTEMPTS": "2"}
    env.pop("INVARDIFF_DATABASE_URL")  # a store-only client
    started = time.monotonic()
    result = run_cli("fetch", "flux-dev", "1024", env=env, timeout=60)
    assert result.returncode == errors.UNREACHABLE, result.stderr
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_readers_are_not_locked_out_while_a_publisher_waits_on_s3(config, frozen_s3, tmp_path):
    """SQLite: a publisher stuck writing the index to a hung S3 holds no database lock."""
    store_url, proxy = frozen_s3
    s3 = replace(config, store_url=store_url, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    make_registry(s3)
    [(path, _)] = plan_variants(tmp_path, 1)
    env = {"INVARDIFF_FAULT": "publish.committed:stop", "INVARDIFF_S3_TIMEOUT": "3"}
    publisher = forked(_publish, s3, path, env=env)
    wait_stopped(publisher[0].pid)
    proxy.freeze()
    os.kill(publisher[0].pid, signal.SIGCONT)
    time.sleep(0.5)  # now retrying the index write against the hung server
    started = time.monotonic()
    listed = run_cli("list", "--json", env={**cli_env(s3), "INVARDIFF_DB_TIMEOUT": "5"})
    assert listed.returncode == 0, listed.stderr
    assert [r["version"] for r in json.loads(listed.stdout)] == [1]
    assert time.monotonic() - started < 15
    result = _finish(*publisher, timeout=30)  # the index write fails in bounded time
    assert result[:2] == ("error", errors.UNREACHABLE), result
    assert "the change is committed" in result[2] and "index rebuild" in result[2]


def test_timeouts_from_the_environment_are_validated(tmp_path: Path):
    env = {"INVARDIFF_STORE_URL": str(tmp_path / "s"), "INVARDIFF_DB_TIMEOUT": "soon"}
    env["INVARDIFF_DATABASE_URL"] = f"sqlite:///{tmp_path / 'r.db'}"
    result = run_cli("init", env=env)
    assert result.returncode == errors.USAGE and "INVARDIFF_DB_TIMEOUT" in result.stderr
    assert not (tmp_path / "r.db").exists()
