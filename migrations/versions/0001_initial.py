"""Initial schema: model aliases, plan targets, versions, aliases and calibration jobs.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("revision", sa.String(length=128), nullable=True),
        sa.Column("arch", sa.String(length=16), nullable=False),
        sa.Column("pipeline", sa.String(length=128), nullable=True),
        sa.Column("scheduler", sa.String(length=128), nullable=True),
        sa.Column("scheduler_config_hash", sa.String(length=64), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("guidance", sa.Float(), nullable=True),
        sa.Column("dtype", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_aliases")),
        sa.UniqueConstraint("name", name=op.f("uq_model_aliases_name")),
    )
    op.create_table(
        "plan_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("revision", sa.String(length=128), nullable=True),
        sa.Column("pipeline", sa.String(length=128), nullable=True),
        sa.Column("scheduler", sa.String(length=128), nullable=True),
        sa.Column("scheduler_config_hash", sa.String(length=64), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("guidance", sa.Float(), nullable=True),
        sa.Column("dtype", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_targets")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_plan_targets_key_hash")),
    )
    op.create_index(op.f("ix_plan_targets_source_revision"), "plan_targets", ["source", "revision"])
    op.create_table(
        "calibration_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_key", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_calibration_jobs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["target_id"],
            ["plan_targets.id"],
            name=op.f("fk_calibration_jobs_target_id_plan_targets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_jobs")),
        sa.UniqueConstraint("job_key", name=op.f("uq_calibration_jobs_job_key")),
    )
    op.create_table(
        "plan_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("object_key", sa.String(length=256), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("calibration_job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('ready', 'revoked')", name=op.f("ck_plan_versions_status")),
        sa.ForeignKeyConstraint(
            ["calibration_job_id"],
            ["calibration_jobs.id"],
            name=op.f("fk_plan_versions_calibration_job_id_calibration_jobs"),
        ),
        sa.ForeignKeyConstraint(
            ["target_id"], ["plan_targets.id"], name=op.f("fk_plan_versions_target_id_plan_targets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_versions")),
        sa.UniqueConstraint("target_id", "sha256", name=op.f("uq_plan_versions_target_id_sha256")),
        sa.UniqueConstraint(
            "target_id", "version", name=op.f("uq_plan_versions_target_id_version")
        ),
    )
    op.create_index(op.f("ix_plan_versions_sha256"), "plan_versions", ["sha256"])
    op.create_table(
        "plan_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("lock_version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["target_id"], ["plan_targets.id"], name=op.f("fk_plan_aliases_target_id_plan_targets")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["plan_versions.id"],
            name=op.f("fk_plan_aliases_version_id_plan_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_aliases")),
        sa.UniqueConstraint("target_id", "name", name=op.f("uq_plan_aliases_target_id_name")),
    )


def downgrade() -> None:
    op.drop_table("plan_aliases")
    op.drop_index(op.f("ix_plan_versions_sha256"), table_name="plan_versions")
    op.drop_table("plan_versions")
    op.drop_table("calibration_jobs")
    op.drop_index(op.f("ix_plan_targets_source_revision"), table_name="plan_targets")
    op.drop_table("plan_targets")
    op.drop_table("model_aliases")
