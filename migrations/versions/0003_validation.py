"""Canonical target key hashes: equal targets are one target.

Before 0002 a plan whose target said ``"height": 1024.0`` hashed differently from one saying
``1024`` while the columns stored the same integers, so two targets could hold the same key.
The code now validates and canonicalizes targets before hashing; this migration recomputes
every target's ``key_hash`` from its columns (the canonical form). Where two existing targets
turn out equal, the newer keeps its old hash: take its versions out of service with
``invardiff-registry revoke`` (see docs/registry.md). No schema change.

Revision ID: 0002_validation
Revises: 0002_faults
Create Date: 2026-11-29
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0002_validation"
down_revision = "0002_faults"
branch_labels = None
depends_on = None

_KEY_FIELDS = (
    "source",
    "revision",
    "pipeline",
    "scheduler",
    "scheduler_config_hash",
    "steps",
    "height",
    "width",
    "guidance",
    "dtype",
)


def canonical_key_hash(row) -> str:
    """sha256 of the canonical key (as ``registry.matching.TargetKey.key_hash`` computes it)."""
    key = {name: getattr(row, name) for name in _KEY_FIELDS}
    for name in ("steps", "height", "width"):
        key[name] = int(key[name])
    if key["guidance"] is not None:
        key["guidance"] = float(key["guidance"]) + 0.0
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def upgrade() -> None:
    targets = sa.table(
        "plan_targets",
        sa.column("id", sa.Integer()),
        sa.column("key_hash", sa.String()),
        *(sa.column(name) for name in _KEY_FIELDS),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(targets).order_by(targets.c.id)).all()
    used = {row.key_hash for row in rows}
    for row in rows:
        wanted = canonical_key_hash(row)
        if wanted != row.key_hash and wanted not in used:
            connection.execute(
                targets.update().where(targets.c.id == row.id).values(key_hash=wanted)
            )
            used.discard(row.key_hash)
            used.add(wanted)


def downgrade() -> None:
    """Nothing to undo: canonical hashes are valid identities for 0001 too."""
