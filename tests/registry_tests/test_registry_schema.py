"""Migrations are the schema: one head, no drift from the ORM, refusal of other revisions."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from registry_helpers import cli_env
from sqlalchemy import inspect, text

from registry import db
from registry.cli import main
from registry.errors import SCHEMA
from registry.models import Base


def test_one_head_and_it_is_the_revision_the_code_needs():
    heads = ScriptDirectory.from_config(db.alembic_config()).get_heads()
    assert heads == [db.SCHEMA_REVISION]


def test_upgrade_head_matches_the_models_and_downgrades_cleanly(database_url):
    engine = db.create(database_url, must_exist=False)
    assert db.current_revision(engine) is None
    assert db.upgrade(engine) == db.SCHEMA_REVISION
    with engine.connect() as connection:
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
        )
        assert diff == [], f"models and migrations drifted: {diff}"
        names = {uc["name"] for uc in inspect(connection).get_unique_constraints("plan_versions")}
        assert names == {"uq_plan_versions_target_id_version", "uq_plan_versions_target_id_sha256"}
    with engine.begin() as connection:
        command.downgrade(db.alembic_config(connection), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert db.upgrade(engine) == db.SCHEMA_REVISION
    engine.dispose()


def test_commands_refuse_a_missing_or_other_schema(database_url, tmp_path, monkeypatch):
    from registry.config import Config

    config = Config.from_env(database_url=database_url, store_url=str(tmp_path / "store"))
    for name, value in cli_env(config).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    engine = db.create(database_url, must_exist=False)
    if database_url.startswith("sqlite"):
        result = runner.invoke(main, ["list"])
        assert result.exit_code == SCHEMA and "run `invardiff-registry init`" in result.stderr
        engine = db.create(database_url, must_exist=False)
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE unrelated (id INTEGER)")
            )  # file exists, no schema
    result = runner.invoke(main, ["fetch", "digits-dit", "16"])
    assert result.exit_code == SCHEMA and "has no registry schema" in result.stderr
    assert runner.invoke(main, ["init"]).exit_code == 0
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0000_older'"))
    result = runner.invoke(main, ["models", "list"])
    assert result.exit_code == SCHEMA
    assert "db upgrade" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    current = runner.invoke(main, ["db", "current", "--json"])
    assert current.exit_code == 0 and '"up_to_date": false' in current.stdout
    engine.dispose()


def test_status_check_constraints_are_built_for_any_number_of_values(database_url):
    import pytest
    from sqlalchemy.exc import IntegrityError

    from registry.models import VERSION_STATUSES, one_of

    assert one_of("status", ("ready",)) == "status IN ('ready')"  # a tuple repr says ('ready',)
    assert one_of("status", ("a", "b_c")) == "status IN ('a', 'b_c')"
    with pytest.raises(ValueError):
        one_of("status", ("it's",))
    engine = db.create(database_url, must_exist=False)
    db.upgrade(engine)
    insert = text(
        "INSERT INTO plan_targets (key_hash, source, steps, height, width, created_at) "
        "VALUES ('k', 's', 1, 1, 1, CURRENT_TIMESTAMP)"
    )
    version = (
        "INSERT INTO plan_versions (target_id, version, sha256, size, object_key, format_version, "
        "status, metrics, lineage, created_at) VALUES ((SELECT id FROM plan_targets), {n}, "
        "'{n}', 1, 'k', 1, '{status}', '{{}}', '{{}}', CURRENT_TIMESTAMP)"
    )
    with engine.begin() as connection:
        connection.execute(insert)
        for n, status in enumerate(VERSION_STATUSES):
            connection.execute(text(version.format(n=n, status=status)))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(version.format(n=9, status="bogus")))
    engine.dispose()
