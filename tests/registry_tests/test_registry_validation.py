"""Input validation and identity (issue 9): canonical targets, revoke, bounded input, no leaks.

Every case runs against real SQLite and PostgreSQL (SeaweedFS where S3 matters) and failed
before the validation layer (``registry/validation.py``) existed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from registry_helpers import FLUX_PLANS, FLUX_SOURCE, ROOT, cli_env, make_registry, snapshot
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from test_registry_cli import cli, closed_port, ok_json  # noqa: F401 - cli is a fixture

from invardiff import CachePlan, load_plan
from registry import db, errors
from registry.checkpoints import BUILTIN_MODELS
from registry.config import Config
from registry.errors import InvalidInput
from registry.index import index_key
from registry.matching import Query, Resolution, TargetKey
from registry.models import PlanTarget, PlanVersion
from registry.service import Registry
from registry.store import put_blob
from registry.validation import MAX_PLAN_BYTES

R1024 = Resolution.parse("1024")
SECRET = "Hunter2-Secret"
BUILTINS = [m.name for m in BUILTIN_MODELS]


def native(tmp_path: Path, name: str, book: Path = FLUX_PLANS[1], **target) -> Path:
    """A native flux-dev plan converted from a reference book, with target fields replaced."""
    plan = load_plan(book, model_id="black-forest-labs/FLUX.1-dev", revision="0123abc")
    return replace(plan, target=replace(plan.target, **target)).save(tmp_path / name)


def edited(tmp_path: Path, name: str, target=None, raw: str = "", **document) -> Path:
    """A native plan file whose JSON is edited as a hand (or an attacker) would.

    ``raw`` is JSON text written in place of the string ``"RAW"``.
    """
    data = json.loads(native(tmp_path, f"base-{name}").read_text())
    data["target"].update(target or {})
    data.pop("summary")  # optional; it depends on the dtype
    data.update(document)
    path = tmp_path / name
    path.write_text(json.dumps(data).replace('"RAW"', raw))  # NaN is written as NaN
    return path


def legacy_key_hash(key: TargetKey) -> str:
    """The hash the old code stored for a target whose plan said ``"height": 1024.0``."""
    return replace(key, height=float(key.height), width=float(key.width)).key_hash


def add_legacy_duplicate(registry: Registry, key: TargetKey, book: Path) -> str:
    """A second target with the same columns as ``key``, as the old code created; its sha256."""
    plan = load_plan(book, model_id="black-forest-labs/FLUX.1-dev", revision="0123abc")
    blob = put_blob(registry.store, plan.to_bytes())
    with registry.session() as session:
        target = PlanTarget(key_hash=legacy_key_hash(key), **key.to_json())
        session.add(target)
        session.flush()
        session.add(
            PlanVersion(
                target_id=target.id,
                version=1,
                sha256=blob.sha256,
                size=blob.size,
                object_key=blob.key,
                format_version=1,
                status="ready",
                metrics={},
                lineage={},
            )
        )
    registry.write_indexes(["flux-dev"])
    return blob.sha256


# ---- item 1: equal targets are one target; revoke ------------------------------------------
def test_a_float_resolution_joins_the_canonical_target(cli, config, tmp_path, monkeypatch):  # noqa: F811
    registry = make_registry(config)
    first = registry.publish(FLUX_PLANS[0], "flux-dev", R1024)
    floats = native(tmp_path, "floats.json", guidance=3.5)  # the engine writes 1024: as a hand:
    floats.write_text(floats.read_text().replace('"height":1024', '"height":1024.0'))
    floats.write_text(floats.read_text().replace('"width":1024', '"width":1024.0'))
    assert '"height":1024.0' in floats.read_text() and '"width":1024.0' in floats.read_text()
    second = registry.publish(floats, "flux-dev", R1024)
    assert (second.created, second.version.version) == (True, 2)
    assert second.target == first.target and second.target.key_hash == first.target.key_hash
    stored = CachePlan.from_bytes(registry.store.get(second.version.object_key)).target
    assert type(stored.height) is int and type(stored.width) is int  # canonical bytes stored
    with registry.session() as session:
        assert session.scalar(select(PlanTarget.id).where(PlanTarget.height == 1024)) is not None
        assert len(session.scalars(select(PlanTarget)).all()) == 1
    monkeypatch.setenv("INVARDIFF_REF_TTL", "0")
    for extra in (
        [],
        ["--index"],
        ["--pipeline", "FluxPipeline", "--dtype", "bfloat16", "--guidance", "3.5"],
    ):
        fetched = ok_json(cli("fetch", "flux-dev", "1024", "--json", *extra))
        assert fetched["version"] == 2 and fetched["sha256"] == second.version.sha256, extra


def test_revoke_takes_a_version_out_of_service(cli, config, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("INVARDIFF_REF_TTL", "0")
    registry = make_registry(config)
    shas = [registry.publish(p, "flux-dev", R1024).version.sha256 for p in FLUX_PLANS[:3]]
    registry.promote(shas[1], "production")

    def fetched(*extra: str) -> int:
        versions = {
            ok_json(cli("fetch", "flux-dev", "1024", "--json", *extra, *how))["version"]
            for how in ([], ["--index"])
        }
        assert len(versions) == 1, versions  # the database and the index agree
        return versions.pop()

    assert fetched() == 3
    revoked = ok_json(cli("revoke", shas[2][:10], "--json"))
    assert (revoked["version"], revoked["status"], revoked["changed"]) == (3, "revoked", True)
    assert fetched() == 2  # latest skips it
    rows = {r["version"]: r for r in ok_json(cli("list", "--json"))}
    assert (rows[3]["status"], rows[3]["latest"], rows[2]["latest"]) == ("revoked", False, True)
    assert "REVOKED" in cli("list").stdout
    assert ok_json(cli("show", shas[2][:10], "--json"))["lineage"]["revoked_by"]

    on_production = ok_json(cli("revoke", shas[1], "--json"))
    assert on_production["aliases"] == ["production"]
    assert fetched() == 1
    for how in ([], ["--index"]):
        refused = cli("fetch", "flux-dev", "1024", "--alias", "production", *how)
        assert refused.exit_code == errors.NOT_FOUND, refused.stderr
    assert "revoked" in cli("fetch", "flux-dev", "1024", "--alias", "production").stderr
    index = registry.store.get(index_key("flux-dev")).decode()
    assert shas[0] in index and shas[1] not in index and shas[2] not in index
    assert "production" not in index  # even an older client cannot serve it
    assert ok_json(cli("revoke", shas[1], "--json"))["changed"] is False  # idempotent
    promoted = cli("promote", shas[1], "--alias", "staging")
    assert promoted.exit_code == errors.USAGE and "revoked" in promoted.stderr
    republished = ok_json(
        cli("publish", str(FLUX_PLANS[1]), "--model", "flux-dev", "--resolution", "1024", "--json")
    )
    assert (republished["created"], republished["status"]) == (False, "revoked")

    assert ok_json(cli("revoke", shas[0], "--json"))["changed"] is True
    for how in ([], ["--index"]):
        gone = cli("fetch", "flux-dev", "1024", *how)
        assert gone.exit_code == errors.NOT_FOUND, (how, gone.stderr)
    assert cli("revoke", "abcdef").exit_code == errors.NOT_FOUND


def test_revoke_repairs_a_model_made_ambiguous_by_a_legacy_duplicate(cli, config, monkeypatch):  # noqa: F811
    """A registry written before canonical targets: two targets with the same columns."""
    monkeypatch.setenv("INVARDIFF_REF_TTL", "0")
    registry = make_registry(config)
    good = registry.publish(FLUX_PLANS[0], "flux-dev", R1024)
    duplicate = add_legacy_duplicate(registry, good.target, FLUX_PLANS[1])
    for how in ([], ["--index"]):
        ambiguous = cli("fetch", "flux-dev", "1024", *how)
        assert ambiguous.exit_code == errors.NOT_FOUND and "several plans" in ambiguous.stderr
    assert cli("revoke", duplicate[:12]).exit_code == 0
    for how in ([], ["--index"]):
        assert ok_json(cli("fetch", "flux-dev", "1024", "--json", *how))["sha256"] == (
            good.version.sha256
        )


def test_migration_0002_makes_legacy_target_hashes_canonical(database_url, tmp_path):
    from alembic import command

    from registry.store import open_store

    engine = db.create(database_url, must_exist=False)
    db.upgrade(engine)
    registry = Registry(engine, open_store(str(tmp_path / "store")))
    registry.add_model("flux-dev", FLUX_SOURCE, "0123abc", "flux", {})
    first = registry.publish(FLUX_PLANS[0], "flux-dev", R1024)
    with engine.begin() as connection:  # what the old code stored for "height": 1024.0
        connection.execute(
            text("UPDATE plan_targets SET key_hash = :legacy"),
            {"legacy": legacy_key_hash(first.target)},
        )
        # back to the revision before 0002_validation (its own downgrade changes nothing)
        command.downgrade(db.alembic_config(connection), "0002_faults")
    assert db.upgrade(engine) == db.SCHEMA_REVISION
    second = registry.publish(FLUX_PLANS[1], "flux-dev", R1024)
    assert second.version.version == 2  # joined the legacy target instead of making a twin
    resolved = registry.resolve(Query(model="flux-dev", resolution=R1024))
    assert resolved.version.sha256 == second.version.sha256
    engine.dispose()


# ---- items 4, 5, 9, 10 and minor: bad input is exit 2 and writes nothing -------------------
def bad_plan_files(tmp_path: Path) -> dict[str, str]:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    nested: dict = {}
    for _ in range(80):
        nested = {"x": nested}
    big = tmp_path / "big.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_PLAN_BYTES + 1)  # sparse: no disk used
    return {
        "nul_dtype": edited(tmp_path, "nul.json", {"dtype": "bfloat16\u0000"}),
        "long_pipeline": edited(tmp_path, "long.json", {"pipeline": "P" * 300}),
        "newline_scheduler": edited(tmp_path, "nl.json", {"scheduler": "Flow\n"}),
        "height_half": edited(tmp_path, "half.json", {"height": 1024.5}),
        "height_text": edited(tmp_path, "text.json", {"height": "1024"}),
        "deep": deep,
        "deep_calibration": edited(tmp_path, "deepcal.json", calibration={"nested": nested}),
        "nan_calibration": edited(tmp_path, "nan.json", calibration={"score": float("nan")}),
        "inf_calibration": edited(tmp_path, "inf.json", calibration={"x": "RAW"}, raw="1e999"),
        "huge_integer": edited(tmp_path, "int.json", calibration={"x": "RAW"}, raw="9" * 5000),
        "long_job_key": edited(tmp_path, "job.json", calibration={"job_key": "k" * 65}),
        "big": big,
    }


BAD = [
    # (arguments, exit code, text in the one-line message); item 4: long strings, huge integers
    (["models", "add", "m1", "hf://org/x", "--arch", "dit", "--dtype", "d" * 20], "dtype is 20"),
    (["models", "add", "m1", "hf://org/x", "--arch", "dit", "--pipeline", "P" * 200], "pipeline"),
    (["models", "add", "m1", "hf://org/x", "--arch", "dit", "--revision", "r" * 200], "revision"),
    (["models", "add", "m1", "hf://" + "x" * 600, "--arch", "dit"], "source is 605"),
    (["models", "add", "m1", "hf://org/x", "--arch", "dit", "--steps", "99999999999"], "--steps"),
    (["models", "add", "n" * 65, "hf://org/x", "--arch", "dit"], "invalid model name"),
    (
        [
            "publish",
            "{flux}",
            "--model",
            "flux-dev",
            "--resolution",
            "1024",
            "--steps",
            "99999999999",
        ],
        "--steps",
    ),
    (["fetch", "flux-dev", "1024", "--steps", "99999999999"], "--steps"),
    (["fetch", "flux-dev", "1024", "--dtype", "d" * 100], "dtype is 100"),
    (["publish", "{nul_dtype}", "--model", "flux-dev", "--resolution", "1024"], "control char"),
    (["publish", "{long_pipeline}", "--model", "flux-dev", "--resolution", "1024"], "pipeline is"),
    (["publish", "{newline_scheduler}", "--model", "flux-dev", "--resolution", "1024"], "control"),
    # item 1: target values are what they say
    (["publish", "{height_half}", "--model", "flux-dev", "--resolution", "1024"], "integer"),
    (["publish", "{height_text}", "--model", "flux-dev", "--resolution", "1024"], "integer"),
    (["publish", "{long_job_key}", "--model", "flux-dev", "--resolution", "1024"], "job_key"),
    # item 5: the whole name must match
    (["models", "add", "evil\n", "hf://org/x", "--arch", "dit"], "invalid model name"),
    (["promote", "{sha}", "--alias", "staging\n"], "invalid alias name"),
    (["fetch", "flux-dev", "1024", "--alias", "production\n"], "invalid alias name"),
    (["fetch", "flux-dev\n", "1024"], "invalid model name"),
    # item 9: documented codes, not "unexpected"
    (["publish", "{deep}", "--model", "flux-dev", "--resolution", "1024"], "nested too deeply"),
    (["publish", "{deep_calibration}", "--model", "flux-dev", "--resolution", "1024"], "deeper"),
    (["publish", "{nan_calibration}", "--model", "flux-dev", "--resolution", "1024"], "NaN"),
    (["publish", "{inf_calibration}", "--model", "flux-dev", "--resolution", "1024"], "inf"),
    (["publish", "{huge_integer}", "--model", "flux-dev", "--resolution", "1024"], "digits"),
    (["--database-url", "postgresql://u:pw@127.0.0.1:abc/x", "list"], "malformed database URL"),
    (["--database-url", "postgresql://u@127.0.0.1:99999/x", "list"], "not in 1..65535"),
    (["gc", "--min-age", "999999999999"], "--min-age"),
    (["show", "{sha}", "--expires", "99999999999"], "--expires"),
    (["--store-url", "s3://Bad_Bucket!/x", "list"], "invalid bucket name"),
    (["--store-url", "s3://ab/x", "promote", "{sha}", "--alias", "staging"], "bucket name"),
    # item 10: bounded plan files
    (["publish", "/dev/zero", "--model", "flux-dev", "--resolution", "1024"], "not a regular"),
    (["publish", "{big}", "--model", "flux-dev", "--resolution", "1024"], "limit"),
    # minor
    (["list", "--model", ""], "invalid model name"),
    (["show", "{sha}", "--model", ""], "invalid model name"),
    (["fetch", "flux-dev", "\uff11\uff10\uff12\uff14"], "malformed resolution"),
    (["fetch", "flux-dev", "1024x\uff15\uff11\uff12"], "malformed resolution"),
    (["fetch", "flux-dev", "9" * 5000], "malformed resolution"),
    # issue 19 item 6: bidi overrides and other invisible characters in text fields
    (["models", "add", "m1", "hf://o/x", "--arch", "dit", "--pipeline", "A\u202eB"], "right-to"),
    (["models", "add", "m1", "hf://o/x", "--arch", "dit", "--revision", "abc\u200b"], "invisible"),
    (["models", "add", "m1", "hf://org/x\u2066", "--arch", "dit"], "invisible"),
    (["models", "add", "m1", "hf://o/x", "--arch", "dit", "--scheduler", "S\x85"], "control"),
    (["fetch", "flux-dev", "1024", "--pipeline", "\u202dFluxPipeline"], "right-to-left"),
]


def test_bad_input_is_exit_2_one_line_and_writes_nothing(cli, config, tmp_path):  # noqa: F811
    registry = make_registry(config)
    sha = registry.publish(FLUX_PLANS[0], "flux-dev", R1024).version.sha256
    registry.promote(sha, "production")
    files = bad_plan_files(tmp_path)
    values = {**{k: str(v) for k, v in files.items()}, "flux": str(FLUX_PLANS[1]), "sha": sha}
    before = snapshot(config)
    for args, message in BAD:
        argv = [a.format(**values) if "{" in a else a for a in args]
        result = cli(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == errors.USAGE, (argv[:4], result.exit_code, result.stderr)
        assert len(lines) == 1 and message in lines[0], (argv[:4], result.stderr)
        assert result.stdout == "" and "unexpected" not in result.stderr
        assert snapshot(config) == before, f"{argv[:4]} changed the registry"


def test_python_callers_are_validated_too(config, tmp_path):
    registry = make_registry(config)
    before = snapshot(config)
    calls = [
        lambda: registry.add_model("m1", "hf://org/x\x00", None, "dit", {}),
        lambda: registry.add_model("m1", "hf://org/x", "r\x00", "dit", {}),
        lambda: registry.add_model("m1", "hf://org/x", None, "dit", {"steps": 10**11}),
        lambda: registry.add_model("m1", "hf://org/x", None, "dit", {"height": 1.5}),
        lambda: registry.add_model("m1", "hf://org/x", None, "dit", {"dtype": "f" * 17}),
        lambda: registry.add_model("m1", "hf://org/x", None, "dit", {"guidance": 10**400}),
        lambda: registry.add_model("m1\n", "hf://org/x", None, "dit", {}),
        lambda: registry.publish("/dev/zero", "flux-dev", R1024),
        lambda: registry.publish(tmp_path, "flux-dev", R1024),
        lambda: registry.versions(""),
        lambda: registry.model("flux-dev\x00"),
        lambda: registry.gc(timedelta(days=10**6)),
        lambda: registry.promote("ab" * 40, "production"),
        lambda: Query(model="flux-dev", resolution=R1024, pipeline="a\x00b"),
        lambda: Query(model="flux-dev", resolution=R1024, pipeline="Flux\u202ePipeline"),
        lambda: registry.add_model("m1", "hf://org/x", None, "dit", {"pipeline": "a\u2067b"}),
        lambda: Query(model="flux-dev", resolution=Resolution(10**9, 1)),
        lambda: Query(model="flux-dev", resolution=R1024, steps=10**12),
        lambda: Config(database_url=None, store_url="s3://UPPER/x", cache_dir=tmp_path),
        lambda: Config(None, "s3://b-1/x", tmp_path, s3_endpoint_url="ftp://host"),
    ]
    for number, call in enumerate(calls):
        with pytest.raises(InvalidInput):
            call()
            pytest.fail(f"call {number} was accepted")
    assert snapshot(config) == before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # refused before any SQL
def test_a_fifo_is_refused_without_waiting_for_a_writer(config, tmp_path):
    make_registry(config)
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "registry",
            "publish",
            str(fifo),
            "--model",
            "flux-dev",
            "--resolution",
            "1024",
        ],
        env={**os.environ, **cli_env(config), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == errors.USAGE and "not a regular file" in result.stderr


def test_s3_endpoint_and_bucket_are_usage_errors_on_seaweed(cli, config, seaweed, monkeypatch):  # noqa: F811
    make_registry(config)
    before = snapshot(config)
    publish = ["publish", str(FLUX_PLANS[0]), "--model", "flux-dev", "--resolution", "1024"]
    monkeypatch.setenv("INVARDIFF_S3_ENDPOINT_URL", seaweed.endpoint)
    for bucket in ("Bad_Bucket!", "ab", "-bucket", "a..b"):
        result = cli("--store-url", f"s3://{bucket}/x", *publish)
        assert result.exit_code == errors.USAGE and "bucket name" in result.stderr, result.stderr
    for endpoint in ("not a url", "http://127.0.0.1:99999", "127.0.0.1:8333"):
        monkeypatch.setenv("INVARDIFF_S3_ENDPOINT_URL", endpoint)
        result = cli("--store-url", f"s3://{seaweed.bucket}/x", *publish)
        assert result.exit_code == errors.USAGE, (endpoint, result.stderr)
        assert "INVARDIFF_S3_ENDPOINT_URL" in result.stderr
    assert snapshot(config) == before


# ---- item 6: no credential in any message, log line or JSON --------------------------------
def test_database_passwords_never_appear(postgres_admin, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from registry_helpers import POSTGRES, drop_postgres_database, new_postgres_database

    from registry.cli import main

    fresh = make_url(new_postgres_database(postgres_admin))
    try:
        server = make_url(POSTGRES)
        host, port, user = server.host, server.port or 5432, server.username
        real = fresh.set(password=SECRET).render_as_string(hide_password=False)
        cases = [
            (f"postgresql:/{user}:{SECRET}@{host}/{fresh.database}", errors.USAGE),
            (f"postgresql://{user}:{SECRET}@{host}:abc/{fresh.database}", errors.USAGE),
            (f"postgresql://{user}:{SECRET}@{host}:99999/{fresh.database}", errors.USAGE),
            (f"mysql+nodriver://{user}:{SECRET}@{host}/db", errors.USAGE),
            (f"postgresql://{user}:{SECRET}:x@[{host}/{fresh.database}", None),
            (f"postgresql://{user}@{host}:{port}/x?password={SECRET}&sslmode=bogus", None),
            (real, errors.SCHEMA),  # connects (trust auth), finds no schema
        ]
        store = ["--store-url", str(tmp_path / "store")]
        for url, code in cases:
            for debug in ("0", "1"):  # the traceback of INVARDIFF_DEBUG is masked too
                monkeypatch.setenv("INVARDIFF_DEBUG", debug)
                result = CliRunner().invoke(main, [*store, "--database-url", url, "list"])
                output = result.stdout + result.stderr
                assert SECRET not in output, (url, debug, output)
                assert code is None or result.exit_code == code, (url, result.stderr)
                assert debug == "1" or len(result.stderr.strip().splitlines()) == 1
        monkeypatch.setenv("INVARDIFF_DEBUG", "0")
        monkeypatch.setenv("INVARDIFF_DATABASE_URL", real)
        shown = CliRunner().invoke(main, [*store, "db", "current", "--json"])
        assert shown.exit_code == 0 and SECRET not in shown.stdout + shown.stderr
        assert SECRET not in repr(Config.from_env(store_url="/x"))
        with pytest.raises(errors.RegistryError) as raised:
            db.check_schema(db.create(real))
        assert SECRET not in str(raised.value) and "***" in str(raised.value)
    finally:
        drop_postgres_database(postgres_admin, fresh.render_as_string(hide_password=False))


# ---- item 8: concurrent init / db upgrade on a fresh PostgreSQL database -------------------
# Import everything, say so, wait for the start signal, run the CLI: the six runs start together.
RACER = """
import pathlib, sys, time
import alembic.command, registry.service
from registry.cli import main
folder = pathlib.Path(sys.argv[1])
(folder / f"ready-{sys.argv[2]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
main(sys.argv[3:], prog_name="invardiff-registry")
"""


def test_six_concurrent_inits_on_a_fresh_postgres_database_serialize(postgres_admin, tmp_path):
    from registry_helpers import drop_postgres_database, new_postgres_database

    url = new_postgres_database(postgres_admin)
    try:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "INVARDIFF_DATABASE_URL": url,
            "INVARDIFF_STORE_URL": str(tmp_path / "store"),
        }
        commands = [["init", "--json"], ["db", "upgrade", "--json"]] * 3
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(tmp_path), str(i), *command],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, command in enumerate(commands)
        ]
        while len(list(tmp_path.glob("ready-*"))) < len(processes):
            assert all(p.poll() is None for p in processes), "a racer died while importing"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=180) for p in processes]
        assert [p.returncode for p in processes] == [0] * 6, [err for _, err in outputs]
        added = [
            json.loads(out)["models_added"]
            for (out, _), command in zip(outputs, commands)
            if command[0] == "init"
        ]
        assert sorted(name for names in added for name in names) == BUILTINS
        engine = db.create(url)
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
            names = connection.execute(text("SELECT name FROM model_aliases ORDER BY name")).all()
        engine.dispose()
        assert [v[0] for v in versions] == [db.SCHEMA_REVISION]
        assert [n[0] for n in names] == BUILTINS
    finally:
        drop_postgres_database(postgres_admin, url)
