"""Migration files: unique numbers in chain order, and every released revision upgrades to head."""

from __future__ import annotations

import re

import pytest
from alembic.script import ScriptDirectory

from registry import db

# Every revision id a released invardiff wrote into a database, oldest first.
RELEASED = ["0001_initial", "0002_faults", "0002_validation", "0003_fleet", "0004_stale", "0005_gate"]


def chain() -> list[tuple[str, str]]:
    """``(file name, revision id)`` from base to head."""
    scripts = ScriptDirectory.from_config(db.alembic_config())
    walked = reversed(list(scripts.walk_revisions("base", "heads")))
    return [(re.sub(r".*/", "", s.path), s.revision) for s in walked]


def test_migration_files_are_numbered_uniquely_in_chain_order() -> None:
    numbers = [int(name.split("_")[0]) for name, _ in chain()]
    assert numbers == list(range(1, len(numbers) + 1)), chain()


def test_the_released_revision_ids_are_kept() -> None:
    assert [revision for _, revision in chain()][: len(RELEASED)] == RELEASED


@pytest.mark.parametrize("released", [RELEASED[-1], "0002_faults", "0002_validation"])
def test_a_database_at_a_released_revision_upgrades_to_head(database_url, released) -> None:
    engine = db.create(database_url, must_exist=False)
    try:
        assert db.upgrade(engine, released) == released
        assert db.upgrade(engine) == db.SCHEMA_REVISION
    finally:
        engine.dispose()
