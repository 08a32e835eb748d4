"""Database connection, schema revision check and Alembic upgrades."""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from .errors import InvalidInput, SchemaMismatch, Unreachable
from .timeouts import db_timeout
from .validation import mask_secrets, url_secrets

# The Alembic head this code is written for; a test checks it equals the migrations' head.
SCHEMA_REVISION = "0005_gate"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Open server connections of each engine, for the transaction deadline (see ``guarded``).
_CONNECTIONS: weakref.WeakKeyDictionary[Engine, weakref.WeakSet] = weakref.WeakKeyDictionary()


def display_url(url: str) -> str:
    """The URL with any password masked (also ``?password=``), for messages."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    return mask_secrets(shown, url_secrets(url))


def _parse(url: str):
    """The parsed URL; a malformed one is :class:`InvalidInput` naming only its scheme."""
    scheme = url.split(":", 1)[0] if ":" in url else ""
    usage = "expected dialect[+driver]://user[:password]@host[:port]/database"
    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidInput(
            f"malformed database URL (scheme {scheme[:32]!r}, rest hidden): {usage}"
        ) from None
    if port is not None and not 1 <= port <= 65535:
        raise InvalidInput(f"database URL {display_url(url)}: port {port} is not in 1..65535")
    return parsed


def create(url: str, must_exist: bool = True) -> Engine:
    """An engine for ``url``. SQLite: foreign keys on, every transaction ``BEGIN IMMEDIATE``.

    With ``must_exist`` a missing SQLite file is an error instead of being created.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
        try:
            engine = create_engine(
                parsed, connect_args=_server_timeouts(db_timeout()), pool_pre_ping=True
            )
        except ImportError as exc:
            detail = mask_secrets(str(exc), url_secrets(url))
            raise InvalidInput(f"no driver for {display_url(url)}: {detail}") from None
        except ArgumentError as exc:  # includes NoSuchModuleError: an unknown dialect
            detail = mask_secrets(str(exc).splitlines()[0], url_secrets(url))
            raise InvalidInput(f"unsupported database URL {display_url(url)}: {detail}") from None
        connections = _CONNECTIONS.setdefault(engine, weakref.WeakSet())
        event.listen(
            engine, "connect", lambda dbapi_connection, _: connections.add(dbapi_connection)
        )
        return engine
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
    engine = create_engine(parsed, connect_args={"timeout": db_timeout()})  # busy timeout

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        dbapi_connection.isolation_level = None  # let the "begin" event issue BEGIN itself
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue instead of deadlocking

    return engine


def _server_timeouts(seconds: float) -> dict:
    """psycopg connect arguments bounding every wait on a PostgreSQL server to ``seconds``."""
    milliseconds = max(1, int(seconds * 1000))
    return {
        "connect_timeout": max(2, min(10, round(seconds))),  # libpq's minimum is 2 s
        "keepalives": 1,  # a vanished host or a cut network: found within about ``seconds``
        "keepalives_idle": max(1, int(seconds / 3)),
        "keepalives_interval": max(1, int(seconds / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": milliseconds,
        "options": " ".join(
            f"-c {name}={milliseconds}"
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        ),
    }


def _cut_off(connections: weakref.WeakSet) -> None:
    """Shut down the sockets of ``connections``: a blocked read then fails at once."""
    for connection in list(connections):
        with (
            suppress(Exception),  # closed already, or not a psycopg connection
            socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def guarded(engine: Engine) -> Iterator[None]:
    """Database work that fails with :class:`Unreachable` instead of hanging.

    Connection failures become one line (see :func:`reachable`). On a server database, when
    the block takes longer than 1.5 x ``INVARDIFF_DB_TIMEOUT`` (a server that stopped
    answering, where no TCP timeout fires), the engine's connections are shut down, which
    makes the blocked call fail; a live server's statement and lock timeouts
    (``INVARDIFF_DB_TIMEOUT``) answer first.
    """
    connections = _CONNECTIONS.get(engine)
    if connections is None:  # SQLite: its busy timeout bounds every wait
        with reachable(str(engine.url)):
            yield
        return
    seconds = 1.5 * db_timeout()
    done, fired = threading.Event(), threading.Event()

    def watchdog() -> None:
        if done.wait(seconds):
            return
        fired.set()
        while not done.is_set():  # also cut reconnections made while the block unwinds
            _cut_off(connections)
            done.wait(0.2)

    thread = threading.Thread(target=watchdog, name="invardiff-db-deadline", daemon=True)
    thread.start()
    try:
        with reachable(str(engine.url)):
            yield
    except Exception:
        if fired.is_set():
            raise Unreachable(
                f"database {display_url(str(engine.url))} did not answer within {seconds:g} s "
                "(INVARDIFF_DB_TIMEOUT)"
            ) from None
        raise
    finally:
        done.set()


@contextmanager
def reachable(url: str) -> Iterator[None]:
    """Turn connection failures into :class:`Unreachable` with a one-line message."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        detail = mask_secrets(detail, url_secrets(url))
        raise Unreachable(f"cannot reach database {display_url(url)}: {detail}") from None


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None when it has no schema yet."""
    with guarded(engine), engine.connect() as connection:
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
        with guarded(engine), engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)
    except CommandError as exc:  # e.g. a database stamped by a newer invardiff
        raise SchemaMismatch(f"cannot upgrade {display_url(str(engine.url))}: {exc}") from None
    return current_revision(engine)
