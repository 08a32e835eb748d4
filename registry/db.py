"""Database connection, schema revision check and Alembic upgrades."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from .errors import InvalidInput, SchemaMismatch, Unreachable

# The Alembic head this code is written for; a test checks it equals the migrations' head.
SCHEMA_REVISION = "0004_stale"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def create(url: str, must_exist: bool = True) -> Engine:
    """An engine for ``url``. SQLite: foreign keys on, every transaction ``BEGIN IMMEDIATE``.

    With ``must_exist`` a missing SQLite file is an error instead of being created.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"malformed database URL {url!r}") from None
    if parsed.get_backend_name() != "sqlite":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
        try:
            return create_engine(parsed, connect_args={"connect_timeout": 5}, pool_pre_ping=True)
        except ImportError as exc:
            raise InvalidInput(f"no driver for {display_url(url)}: {exc}") from None
        except ArgumentError as exc:  # includes NoSuchModuleError: an unknown dialect
            detail = str(exc).splitlines()[0]
            raise InvalidInput(f"unsupported database URL {display_url(url)}: {detail}") from None
    path = Path(parsed.database or "")
    if parsed.database in (None, "", ":memory:"):
        raise InvalidInput("the registry needs a SQLite file, not an in-memory database")
    if must_exist and not path.exists():
        raise SchemaMismatch(f"no registry database at {path}: run `invardiff-registry init`")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unreachable(
            f"cannot create the database folder {path.parent}: {exc.strerror or exc}"
        ) from None
    engine = create_engine(parsed, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        dbapi_connection.isolation_level = None  # let the "begin" event issue BEGIN itself
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue instead of deadlocking

    return engine


@contextmanager
def reachable(url: str) -> Iterator[None]:
    """Turn connection failures into :class:`Unreachable` with a one-line message."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise Unreachable(f"cannot reach database {display_url(url)}: {detail}") from None


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None when it has no schema yet."""
    with reachable(str(engine.url)), engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def check_schema(engine: Engine) -> None:
    """Refuse a database that is not at :data:`SCHEMA_REVISION`, saying how to fix it."""
    revision = current_revision(engine)
    if revision == SCHEMA_REVISION:
        return
    where = display_url(str(engine.url))
    if revision is None:
        raise SchemaMismatch(
            f"database {where} has no registry schema: run `invardiff-registry init`"
        )
    raise SchemaMismatch(
        f"database {where} is at schema {revision}, this tool needs {SCHEMA_REVISION}: "
        "run `invardiff-registry db upgrade` (or upgrade invardiff if the database is newer)"
    )


def alembic_config(connection=None):
    """An Alembic config for the packaged migrations (independent of the working directory)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Run the migrations up to ``revision``; return the resulting revision."""
    from alembic import command
    from alembic.util import CommandError

    try:
        with reachable(str(engine.url)), engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)
    except CommandError as exc:  # e.g. a database stamped by a newer invardiff
        raise SchemaMismatch(f"cannot upgrade {display_url(str(engine.url))}: {exc}") from None
    return current_revision(engine)
