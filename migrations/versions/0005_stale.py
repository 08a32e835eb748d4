"""Operator marks on plan versions (``invardiff-registry mark-stale``).

Revision ID: 0004_stale
Revises: 0003_fleet
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_stale"
down_revision = "0003_fleet"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("stale_marked_at", sa.DateTime(timezone=True)),
    ("stale_marked_by", sa.String(length=128)),
    ("stale_reason", sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table("plan_versions") as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("plan_versions") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
