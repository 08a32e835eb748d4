"""A plan version may be ``failed_gate``: recorded with its metrics, never served.

Revision ID: 0005_gate
Revises: 0004_stale
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0005_gate"
down_revision = "0004_stale"
branch_labels = None
depends_on = None

_NAME = "ck_plan_versions_status"


def _status_check(statuses: str) -> None:
    with op.batch_alter_table("plan_versions") as batch:
        batch.drop_constraint(op.f(_NAME), type_="check")
        batch.create_check_constraint(op.f(_NAME), f"status IN ({statuses})")


def upgrade() -> None:
    _status_check("'ready', 'revoked', 'failed_gate'")


def downgrade() -> None:
    op.execute("UPDATE plan_versions SET status = 'revoked' WHERE status = 'failed_gate'")
    _status_check("'ready', 'revoked'")
