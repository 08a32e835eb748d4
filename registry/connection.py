"""The registry's connection: its database engine, its object store and transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from . import db
from .config import Config
from .errors import RegistryError
from .store import ObjectStore, open_store


class Connection:
    """The registry database plus its object store: what every registry operation starts from."""

    def __init__(self, engine: Engine, store: ObjectStore) -> None:
        self.engine = engine
        self.store = store

    @classmethod
    def open(cls, config: Config, create: bool = False, check_schema: bool = True) -> Connection:
        """Connect to the configured database and store.

        ``create`` makes a missing SQLite file; ``check_schema`` refuses a database that is
        not at this tool's schema revision.
        """
        store = open_store(config.store_url, config.s3_endpoint_url)
        if not config.database_url:
            raise RegistryError(
                "this command needs the registry database: set INVARDIFF_DATABASE_URL "
                "(with only INVARDIFF_STORE_URL set, the registry can only fetch)"
            )
        engine = db.create(config.database_url, must_exist=not create)
        if check_schema:
            db.check_schema(engine)
        return cls(engine, store)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction; connection failures become :class:`~registry.errors.Unreachable`."""
        with (
            db.guarded(self.engine),
            Session(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session
