"""Alembic environment: runs on the connection the registry passes in, or on the configured URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, text

from registry.config import Config
from registry.db import create
from registry.models import Base

target_metadata = Base.metadata
# pg_advisory_xact_lock key of schema changes ("invardif" in ASCII): concurrent `init` or
# `db upgrade` runs on PostgreSQL wait for each other instead of racing to create tables.
MIGRATION_LOCK = 0x696E76617264696E


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":  # SQLite: BEGIN IMMEDIATE serializes already
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    batch = connection.dialect.name == "sqlite"  # SQLite cannot ALTER most things in place
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=batch,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = (
        context.config.get_main_option("sqlalchemy.url")
        or os.environ.get("INVARDIFF_DATABASE_URL")  # migrations need no object store
        or Config.from_env().database_url
    )
    if not url:
        raise SystemExit("no database configured: set INVARDIFF_DATABASE_URL")
    engine = create(url, must_exist=False)
    with engine.begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
