"""Object leases: publish and gc claim a store object while writing or deleting it.

Revision ID: 0002_faults
Revises: 0001_initial
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_faults"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "object_leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("object_key", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('publish', 'gc')", name=op.f("ck_object_leases_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_object_leases")),
        sqlite_autoincrement=True,  # an id is never reused: it names one lease
    )
    op.create_index(op.f("ix_object_leases_object_key"), "object_leases", ["object_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_object_leases_object_key"), table_name="object_leases")
    op.drop_table("object_leases")
