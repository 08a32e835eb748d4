"""Calibration fleet: job leases, heartbeats, shard progress, timings and result.

Revision ID: 0003_fleet
Revises: 0002_validation
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_fleet"
down_revision = "0002_validation"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("lease_holder", sa.String(length=128)),
    ("heartbeat_at", sa.DateTime(timezone=True)),
    ("lease_expires_at", sa.DateTime(timezone=True)),
    ("progress", sa.JSON()),
    ("timings", sa.JSON()),
    ("result", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("calibration_jobs") as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.create_index(op.f("ix_calibration_jobs_status"), ["status"])
        batch.create_index(op.f("ix_calibration_jobs_model"), ["model"])


def downgrade() -> None:
    with op.batch_alter_table("calibration_jobs") as batch:
        batch.drop_index(op.f("ix_calibration_jobs_model"))
        batch.drop_index(op.f("ix_calibration_jobs_status"))
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
