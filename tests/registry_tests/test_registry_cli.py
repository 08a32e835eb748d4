"""The CLI: JSON shapes, exit codes, one-line errors that change nothing, fast start-up."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from registry_helpers import DIT_PLANS, FLUX_PLANS, ROOT, cli_env, make_registry, run_cli, snapshot

from registry import errors
from registry.cli import main
from registry.matching import Resolution


@pytest.fixture
def cli(config, monkeypatch):
    """Invoke the CLI in-process against ``config``; returns the click Result."""
    for name, value in cli_env(config).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args))

    return invoke


def ok_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # stdout holds the JSON document and nothing else


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_end_to_end_json_shapes(cli, tmp_path: Path):
    init = ok_json(cli("init", "--json"))
    assert init["models_added"] == ["digits-dit", "digits-flux", "digits-flux-shifted"] and init["revision"]
    assert ok_json(cli("db", "current", "--json"))["up_to_date"] is True
    added = ok_json(
        cli(
            "models",
            "add",
            "flux-dev",
            "hf://black-forest-labs/FLUX.1-dev",
            "--revision",
            "0123abc",
            "--arch",
            "flux",
            "--json",
        )
    )
    assert added["name"] == "flux-dev" and added["steps"] == 28 and added["revision"] == "0123abc"
    assert [m["name"] for m in ok_json(cli("models", "list", "--json"))] == [
        "digits-dit",
        "digits-flux",
        "digits-flux-shifted",
        "flux-dev",
    ]
    assert ok_json(cli("models", "show", "flux-dev", "--json"))["arch"] == "flux"

    published = [
        ok_json(cli("publish", str(p), "--model", "flux-dev", "--resolution", "1024", "--json"))
        for p in FLUX_PLANS
    ]
    assert [p["version"] for p in published] == [1, 2, 3, 4] and all(
        p["created"] for p in published
    )
    assert set(published[0]) >= {
        "created",
        "model",
        "target",
        "version",
        "sha256",
        "size",
        "object_key",
        "status",
    }
    again = cli(
        "publish",
        str(FLUX_PLANS[0]),
        "--model",
        "flux-dev",
        "--resolution",
        "1024",
        "--steps",
        "28",
        "--json",
    )
    assert ok_json(again)["created"] is False and "stored plans/sha256/" in again.stderr

    listed = ok_json(cli("list", "--json"))
    assert [r["version"] for r in listed] == [1, 2, 3, 4] and listed[-1]["latest"] is True
    assert set(listed[0]) >= {
        "models",
        "target",
        "resolution",
        "version",
        "sha256",
        "aliases",
        "latest",
    }
    sha = published[1]["sha256"]
    shown = ok_json(cli("show", sha[:8], "--json"))
    assert shown["sha256"] == sha and shown["lineage"]["source_file"] == FLUX_PLANS[1].name

    promoted = ok_json(cli("promote", sha[:12], "--alias", "production", "--expect", "0", "--json"))
    assert (promoted["version"], promoted["lock_version"], promoted["previous_version"]) == (
        2,
        1,
        None,
    )

    fetched = cli("fetch", "flux-dev", "1024", "--json")
    doc = ok_json(fetched)
    assert {"path", "sha256", "version", "match"} <= set(doc)
    assert (doc["match"], doc["version"], doc["cached"], doc["sha256"]) == (
        "exact",
        4,
        False,
        published[3]["sha256"],
    )
    assert Path(doc["path"]).read_bytes() and "exact match" in fetched.stderr
    assert ok_json(cli("fetch", "flux-dev", "1024", "--json"))["cached"] is True
    pinned = ok_json(
        cli(
            "fetch",
            "flux-dev",
            "1024",
            "--alias",
            "production",
            "--dest",
            str(tmp_path / "out"),
            "--json",
        )
    )
    assert pinned["version"] == 2 and Path(pinned["path"]).parent == tmp_path / "out"
    assert Path(pinned["path"]).read_bytes() == Path(pinned["cache_path"]).read_bytes()
    nearest = ok_json(cli("fetch", "flux-dev", "512", "--allow-nearest", "--json"))
    assert (nearest["match"], nearest["resolution"], nearest["requested"]) == (
        "nearest",
        "1024x1024",
        "512x512",
    )
    plain = cli("fetch", "flux-dev", "1024")
    assert plain.exit_code == 0 and plain.stdout.strip() == doc["path"]

    assert ok_json(cli("verify", "--json")) == {
        "checked": 4,
        "ok": 4,
        "indexes_checked": 4,
        "failures": [],
    }
    assert ok_json(cli("gc", "--dry-run", "--json"))["deleted"] == []


BAD_INPUTS = [
    # (arguments, expected exit code, text expected in the one-line message)
    (["fetch", "flux-dev", "10x"], errors.USAGE, "malformed resolution"),
    (["fetch", "flux-dev", "0"], errors.USAGE, "between 1 and"),
    (["fetch", "flux-dev", "1024", "--steps", "-3"], errors.USAGE, "--steps"),
    (
        ["fetch", "no-such-model", "1024"],
        errors.NOT_FOUND,
        "known models: digits-dit, digits-flux, digits-flux-shifted, flux-dev",
    ),
    (
        ["fetch", "flux-dev", "1024", "--steps", "50"],
        errors.NOT_FOUND,
        "published: 1024x1024, 28 steps",
    ),
    (["fetch", "flux-dev", "1024", "--alias", "staging"], errors.NOT_FOUND, "aliases: latest"),
    (["fetch", "flux-dev", "1024", "--alias", "Bad Alias"], errors.USAGE, "invalid alias name"),
    (
        ["publish", "{dit}", "--model", "flux-dev", "--resolution", "1024"],
        errors.USAGE,
        "is a dit plan",
    ),
    (
        ["publish", "{flux}", "--model", "flux-dev", "--resolution", "1024", "--steps", "50"],
        errors.USAGE,
        "--steps 50",
    ),
    (
        ["publish", "{flux}", "--model", "nobody", "--resolution", "1024"],
        errors.NOT_FOUND,
        "unknown model",
    ),
    (
        ["publish", "{flux}", "--model", "flux-dev", "--resolution", "big"],
        errors.USAGE,
        "malformed resolution",
    ),
    (
        ["publish", "{garbage}", "--model", "flux-dev", "--resolution", "1024"],
        errors.USAGE,
        "not valid JSON",
    ),
    (
        ["publish", "{missing}", "--model", "flux-dev", "--resolution", "1024"],
        errors.USAGE,
        "cannot read plan",
    ),
    (["publish", "{flux}", "--resolution", "1024"], errors.USAGE, "--model"),
    (
        ["promote", "abcdef", "--alias", "production"],
        errors.NOT_FOUND,
        "no plan with sha256 starting abcdef",
    ),
    (["promote", "{sha}", "--alias", "latest"], errors.USAGE, "computed"),
    (
        ["promote", "{sha}", "--alias", "production", "--expect", "5"],
        errors.CONFLICT,
        "moved since you read it",
    ),
    (["show", "zz"], errors.USAGE, "at least 6 hex digits"),
    (["models", "show", "nobody"], errors.NOT_FOUND, "unknown model"),
    (["models", "add", "new-model", "hf://org/some-model"], errors.USAGE, "--arch"),
    (
        ["models", "add", "flux-dev", "hf://org/other", "--arch", "flux"],
        errors.CONFLICT,
        "--update",
    ),
    (["models", "add", "Upper", "hf://org/x", "--arch", "dit"], errors.USAGE, "invalid model name"),
    (["models", "add", "x", "hf://org/x", "--arch", "unet"], errors.USAGE, "--arch"),
    (
        ["--database-url", "postgresql://postgres@127.0.0.1:{port}/x", "list"],
        errors.UNREACHABLE,
        "cannot reach database",
    ),
    (
        [
            "--database-url",
            "postgresql://postgres@127.0.0.1:{port}/x",
            "publish",
            "{flux}",
            "--model",
            "flux-dev",
            "--resolution",
            "1024",
        ],
        errors.UNREACHABLE,
        "cannot reach database",
    ),
    (
        [
            "--store-url",
            "{file}",
            "publish",
            "{flux2}",
            "--model",
            "flux-dev",
            "--resolution",
            "1024",
        ],
        errors.UNREACHABLE,
        "cannot write to store",
    ),
    (
        [
            "--store-url",
            "s3://bucket/x",
            "publish",
            "{flux2}",
            "--model",
            "flux-dev",
            "--resolution",
            "1024",
        ],
        errors.UNREACHABLE,
        "cannot reach store",
    ),
    (["--database-url", "notaurl", "list"], errors.USAGE, "malformed database URL"),
    (["frobnicate"], errors.USAGE, "No such command"),
    # an unreachable store fails writers before the database changes
    (
        ["--store-url", "{file}", "promote", "{sha}", "--alias", "staging"],
        errors.UNREACHABLE,
        "cannot write to store",
    ),
    (
        ["--store-url", "{file}/sub", "models", "add", "new-model", "hf://org/x", "--arch", "dit"],
        errors.UNREACHABLE,
        "cannot write to store",
    ),
    (
        ["--store-url", "s3://bucket/x", "promote", "{sha}", "--alias", "staging"],
        errors.UNREACHABLE,
        "cannot reach store",
    ),
    (
        [
            "--store-url",
            "s3://bucket/x",
            "models",
            "add",
            "new-model",
            "hf://org/x",
            "--arch",
            "dit",
        ],
        errors.UNREACHABLE,
        "cannot reach store",
    ),
    # non-finite floats
    (
        ["models", "add", "new-model", "hf://org/x", "--arch", "dit", "--guidance", "nan"],
        errors.USAGE,
        "not a finite number",
    ),
    (["fetch", "flux-dev", "1024", "--guidance", "inf"], errors.USAGE, "not a finite number"),
    (["fetch", "flux-dev", "1024", "--guidance", "-Infinity"], errors.USAGE, "not a finite"),
    # bad database URLs
    (["--database-url", "foo://x", "list"], errors.USAGE, "unsupported database URL foo://x"),
    (
        ["--database-url", "sqlite:////proc/nope/x.db", "init"],
        errors.UNREACHABLE,
        "cannot create the database folder /proc/nope",
    ),
    # model names become object keys
    (["fetch", "../../etc", "1024", "--index"], errors.USAGE, "invalid model name"),
    (["fetch", "../../etc", "1024"], errors.USAGE, "invalid model name"),
    (
        ["--store-url", "s3://bucket/x", "fetch", "../x", "16", "--index"],
        errors.USAGE,
        "invalid model name",
    ),
    (["show", "{sha}", "--model", "nobody"], errors.NOT_FOUND, "unknown model"),
]


def test_bad_inputs_are_one_line_and_change_nothing(cli, config, tmp_path: Path, monkeypatch):
    registry = make_registry(config)
    sha = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024")).version.sha256
    registry.promote(sha, "production")
    (tmp_path / "garbage.json").write_text("{nope")
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("INVARDIFF_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    values = {
        "dit": str(DIT_PLANS[0]),
        "flux": str(FLUX_PLANS[0]),
        "flux2": str(FLUX_PLANS[1]),
        "garbage": str(tmp_path / "garbage.json"),
        "missing": str(tmp_path / "missing.json"),
        "file": str(tmp_path / "a-file"),
        "sha": sha[:12],
        "port": str(closed_port()),
    }
    before = snapshot(config)
    for args, code, text in BAD_INPUTS:
        argv = [a.format(**values) for a in args]
        result = cli(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == code, (argv, result.exit_code, result.stderr)
        assert len(lines) == 1 and text in lines[0], (argv, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.stderr, argv
        assert snapshot(config) == before, f"{argv} changed the registry"


def test_tampered_object_is_refused_with_the_integrity_code(
    cli, config, seaweed, seaweed_store, monkeypatch
):
    config = replace(config, store_url=seaweed_store, s3_endpoint_url=seaweed.endpoint)
    for name, value in cli_env(config).items():
        monkeypatch.setenv(name, value)
    assert cli("init").exit_code == 0
    cli("models", "add", "flux-dev", "hf://black-forest-labs/FLUX.1-dev", "--revision", "0123abc")
    published = ok_json(
        cli("publish", str(FLUX_PLANS[0]), "--model", "flux-dev", "--resolution", "1024", "--json")
    )
    bucket, prefix = seaweed_store.removeprefix("s3://").split("/", 1)
    seaweed.client().put_object(
        Bucket=bucket, Key=f"{prefix}/{published['object_key']}", Body=b'{"tampered": true}'
    )
    before = snapshot(config)
    for args in (
        ["fetch", "flux-dev", "1024"],
        ["fetch", "flux-dev", "1024", "--index"],
        ["verify"],
    ):
        result = cli(*args)
        assert result.exit_code == errors.INTEGRITY, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert "integrity check failed" in result.stderr or "failed verification" in result.stderr
    assert snapshot(config) == before
    assert not Path(config.cache_dir).exists() or not any(Path(config.cache_dir).rglob("*.json"))


# ---- real subprocesses ---------------------------------------------------------------------
HEAVY = ("torch", "diffusers", "ray", "sqlalchemy", "boto3", "alembic")
DRIVER = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('MODULES', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
    "from registry.cli import main\n"
    "main(prog_name='invardiff-registry')\n"
)


def run_traced(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI in a subprocess; also return which heavy modules it imported."""
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    marker = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
    return result, ast.literal_eval(marker.removeprefix("MODULES "))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_help_and_cached_fetch_import_no_heavy_modules(config):
    make_registry(config).publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    env = cli_env(config)
    result, imported = run_traced("--help", env=env)
    assert result.returncode == 0 and "fetch" in result.stdout and imported == []
    first = run_cli("fetch", "flux-dev", "1024", env=env)
    assert first.returncode == 0, first.stderr
    unreachable = {
        **env,
        "INVARDIFF_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/x",
    }
    cached, imported = run_traced("fetch", "flux-dev", "1024", "--json", env=unreachable)
    assert cached.returncode == 0, cached.stderr  # a hit needs no database and no store
    assert json.loads(cached.stdout)["cached"] is True and imported == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_subprocess_errors_are_one_line_without_traceback(config):
    make_registry(config)
    env = cli_env(config)
    cases = [
        (["fetch", "flux-dev", "1024x"], errors.USAGE),
        (["fetch", "flux-dev", "1024", "--steps", "-1"], errors.USAGE),
        (["fetch", "nobody", "1024"], errors.NOT_FOUND),
        (["fetch", "flux-dev", "1024"], errors.NOT_FOUND),
        (
            ["--database-url", f"postgresql://u@127.0.0.1:{closed_port()}/x", "list"],
            errors.UNREACHABLE,
        ),
    ]
    for args, code in cases:
        result = run_cli(*args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, (
            args
        )
        assert result.stdout == ""
    debug = run_cli("fetch", "nobody", "1024", env={**env, "INVARDIFF_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ---- configuration, disambiguation, ref expiry, cache repair, failed writes ----------------
def test_a_server_database_without_a_store_url_is_refused(cli, config, monkeypatch, tmp_path):
    monkeypatch.delenv("INVARDIFF_STORE_URL")
    server = f"postgresql://postgres@127.0.0.1:{closed_port()}/x"
    for args in (
        ["--database-url", server, "list"],
        ["--database-url", server, "fetch", "m", "16"],
    ):
        result = cli(*args)
        assert result.exit_code == errors.USAGE, (args, result.stderr)
        assert (
            len(result.stderr.strip().splitlines()) == 1 and "INVARDIFF_STORE_URL" in result.stderr
        )
    monkeypatch.setenv("INVARDIFF_DATABASE_URL", server)
    assert cli("models", "list").exit_code == errors.USAGE
    assert cli("fetch", "--help").exit_code == 0  # help needs no configuration
    local = cli("--store-url", str(tmp_path / "here"), "list")  # an explicit local store is fine
    assert local.exit_code == errors.UNREACHABLE and "cannot reach database" in local.stderr
    monkeypatch.delenv("INVARDIFF_DATABASE_URL")
    embedded = cli("init", "--json")  # nothing set: SQLite and a store under INVARDIFF_HOME
    assert embedded.exit_code == 0, embedded.stderr


def test_a_plan_published_for_two_checkpoints_is_chosen_with_model(cli, config, tmp_path):
    from test_registry_service import native_flux

    assert cli("init").exit_code == 0
    # "org/shared" is both the checkpoint of shared-a and the source of shared-b (unpinned)
    for name, source in (("shared-a", "hf://org/shared"), ("shared-b", "org/shared")):
        assert cli("models", "add", name, source, "--arch", "flux").exit_code == 0
    plan = native_flux(tmp_path, model_id="org/shared", revision=None)
    shas = {
        ok_json(cli("publish", str(plan), "--model", m, "--resolution", "1024", "--json"))["sha256"]
        for m in ("shared-a", "shared-b")
    }
    assert len(shas) == 1
    sha = shas.pop()
    for args in (["show", sha], ["promote", sha, "--alias", "production"]):
        result = cli(*args)
        assert result.exit_code == errors.USAGE and "pass --model" in result.stderr, result.stderr
    assert ok_json(cli("show", sha, "--model", "shared-b", "--json"))["models"] == ["shared-b"]
    promoted = ok_json(
        cli("promote", sha[:8], "--alias", "production", "--model", "shared-a", "--json")
    )
    assert promoted["target"]["source"] == "hf://org/shared"
    assert (
        ok_json(cli("fetch", "shared-a", "1024", "--alias", "production", "--json"))["sha256"]
        == sha
    )
    assert cli("fetch", "shared-b", "1024", "--alias", "production").exit_code == errors.NOT_FOUND


def _age_refs(cache_dir: Path, seconds: float) -> None:
    import time

    for ref in (Path(cache_dir) / "refs").glob("*.json"):
        record = json.loads(ref.read_text())
        record["resolved_at"] = time.time() - seconds
        ref.write_text(json.dumps(record))


def test_cached_answers_expire_after_the_ref_ttl(cli, config, monkeypatch):
    registry = make_registry(config)
    shas = [
        registry.publish(p, "flux-dev", Resolution.parse("1024")).version.sha256
        for p in FLUX_PLANS[:2]
    ]
    registry.promote(shas[0], "production")
    production = ("fetch", "flux-dev", "1024", "--alias", "production", "--json")
    first = ok_json(cli(*production))
    assert (first["sha256"], first["cached"], first["stale"]) == (shas[0], False, False)
    registry.promote(shas[1], "production")
    assert ok_json(cli(*production))["sha256"] == shas[0]  # within the TTL: no registry access
    _age_refs(config.cache_dir, 601)  # past the default TTL (600 s): resolved again
    moved = ok_json(cli(*production))
    assert (moved["sha256"], moved["cached"]) == (shas[1], False)

    registry.promote(shas[0], "production")
    _age_refs(config.cache_dir, 601)
    offline = cli("--database-url", f"postgresql://u@127.0.0.1:{closed_port()}/x", *production)
    document = ok_json(offline)  # registry unreachable: the expired answer, marked stale
    assert (document["sha256"], document["cached"], document["stale"]) == (shas[1], True, True)
    assert "stale" in offline.stderr
    refresh = cli(
        "--database-url", f"postgresql://u@127.0.0.1:{closed_port()}/x", *production, "--refresh"
    )
    assert refresh.exit_code == errors.UNREACHABLE  # --refresh insists on the registry

    monkeypatch.setenv("INVARDIFF_REF_TTL", "0")
    assert ok_json(cli(*production))["sha256"] == shas[0]
    monkeypatch.setenv("INVARDIFF_REF_TTL", "soon")
    bad = cli(*production)
    assert bad.exit_code == errors.USAGE and "INVARDIFF_REF_TTL" in bad.stderr


def test_a_damaged_cached_blob_is_replaced_not_deleted_on_read(cli, config):
    from registry.cache import Cache

    registry = make_registry(config)
    registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    first = ok_json(cli("fetch", "flux-dev", "1024", "--json"))
    blob = Path(first["cache_path"])
    blob.write_bytes(b"damaged")
    assert Cache(Path(config.cache_dir)).valid_blob(first["sha256"], first["size"]) is None
    assert blob.read_bytes() == b"damaged"  # reading never deletes: that could hit a fresh rename
    again = ok_json(cli("fetch", "flux-dev", "1024", "--json"))
    assert (again["sha256"], again["cached"]) == (first["sha256"], False)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == first["sha256"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_failed_write_is_exit_5_and_leaves_no_temporary_file(config, tmp_path):
    """A real write failure: the file size limit (EFBIG) stands in for a full disk.

    (On PostgreSQL: with SQLite the limit would stop the publish's lease write first.)
    """
    import resource
    import signal

    registry = make_registry(config)
    registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    limit = 4096  # the plans are larger

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, **cli_env(config), "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    before = snapshot(config)
    for args, where in (
        (["publish", str(FLUX_PLANS[1]), "--model", "flux-dev", "--resolution", "1024"], "store"),
        (["fetch", "flux-dev", "1024"], "cache"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "registry", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            preexec_fn=small_files,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == errors.UNREACHABLE, (args, result.stderr)
        assert len(lines) == 1 and f"cannot write to {where}" in lines[0], result.stderr
        after = snapshot(config)
        assert {**after, "cache": []} == {**before, "cache": []}, args
    leftovers = [*Path(config.store_url).rglob(".tmp-*"), *Path(config.cache_dir).rglob("*")]
    assert [p for p in leftovers if p.is_file()] == []  # no temporary file, nothing cached


def documented_exit_codes(doc: Path) -> set[int]:
    """The codes in a doc's ``## Exit codes`` table."""
    section = doc.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line[:3].strip("| ").isdigit()]
    return {int(code) for row in rows for code in row.split(",")}


def test_top_level_help_lists_every_documented_exit_code():
    from workers import errors as fleet_errors

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {int(line.split()[0]) for line in result.stdout.split("Exit codes:")[1].split("\n\n")[0].splitlines()
              if line.strip()}  # fmt: skip
    documented = documented_exit_codes(ROOT / "docs" / "registry.md") | documented_exit_codes(
        ROOT / "docs" / "fleet.md"
    )
    defined = {
        value
        for module in (errors, fleet_errors)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, int)
    }
    signals = {130, 143}  # 128 + SIGINT / SIGTERM: the shell's convention, not an error constant
    assert documented & signals == signals and documented - signals == listed == defined == set(range(11))


def test_top_level_help_lists_the_signal_exit_codes():
    """130 and 143 (docs/fleet.md), after the error codes: an interrupted driver's exits."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    signals = result.stdout.split("Exit codes:")[1].split("\n\n")[1].splitlines()
    assert [line.split()[0] for line in signals[1:]] == ["130", "143"]
    assert "SIGINT" in signals[1] and "SIGTERM" in signals[2]


def test_help_explains_every_option_without_internal_notes():
    import click

    ctx = click.Context(main)
    commands = [(name, main.get_command(ctx, name)) for name in main.list_commands(ctx)]
    seen = 0
    while commands:
        name, command = commands.pop()
        if isinstance(command, click.Group):
            commands += [(f"{name} {n}", command.get_command(ctx, n)) for n in command.list_commands(ctx)]
            continue
        if command.callback.__module__.startswith(("registry.", "invardiff_cli.")) or name == "calibrate":
            seen += 1
            assert all(p.help for p in command.params if isinstance(p, click.Option)), name
    assert seen >= 15
    calibrate = CliRunner().invoke(main, ["calibrate", "--help"])
    assert calibrate.exit_code == 0 and "needs invardiff" not in calibrate.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_show_prints_the_lineage_for_people_and_json_for_programs(cli, registry):
    sha = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024")).version.sha256
    data = ok_json(cli("show", sha[:8], "--json"))
    human = cli("show", sha[:8])
    assert human.exit_code == 0, human.stderr
    lines = human.stdout.splitlines()
    assert not [line for line in lines if "{" in line or '"' in line]  # no JSON in the human view
    top = {line.split(":")[0] for line in lines if not line.startswith(" ")}
    assert top == set(data)  # every field, each on its own line
    lineage = lines.index("lineage:")
    assert lines[lineage + 1].split() == ["source_file:", FLUX_PLANS[0].name]
    assert "    source: reference" in lines  # nested two deep
    assert max(len(line) for line in lines) < 120
    assert data["lineage"]["source_file"] == FLUX_PLANS[0].name  # --json keeps its shape
