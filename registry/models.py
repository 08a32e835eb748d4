"""The registry's tables as a typed SQLAlchemy 2.x ORM.

The schema itself is defined by the Alembic migrations in ``migrations/``; a test fails
when these models and the migrations' head drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .stamps import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
VERSION_STATUSES = ("ready", "revoked", "failed_gate")


def one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL ``column IN ('a', 'b')`` for a CHECK constraint (any number of plain values)."""
    for value in values:
        if not value.replace("_", "").isalnum():
            raise ValueError(f"not a plain value for a CHECK constraint: {value!r}")
    return f"{column} IN (" + ", ".join(f"'{value}'" for value in values) + ")"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class ModelAlias(Base):
    """A model name (``flux-dev``) -> checkpoint source and revision, with pipeline defaults."""

    __tablename__ = "model_aliases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str | None] = mapped_column(String(128))
    arch: Mapped[str] = mapped_column(String(16))
    pipeline: Mapped[str | None] = mapped_column(String(128))
    scheduler: Mapped[str | None] = mapped_column(String(128))
    scheduler_config_hash: Mapped[str | None] = mapped_column(String(64))
    steps: Mapped[int | None]
    height: Mapped[int | None]
    width: Mapped[int | None]
    guidance: Mapped[float | None] = mapped_column(Float)
    dtype: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PlanTarget(Base):
    """The matching key of plans: one checkpoint and one exact sampling setup."""

    __tablename__ = "plan_targets"
    __table_args__ = (Index(None, "source", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str | None] = mapped_column(String(128))
    pipeline: Mapped[str | None] = mapped_column(String(128))
    scheduler: Mapped[str | None] = mapped_column(String(128))
    scheduler_config_hash: Mapped[str | None] = mapped_column(String(64))
    steps: Mapped[int]
    height: Mapped[int]
    width: Mapped[int]
    guidance: Mapped[float | None] = mapped_column(Float)
    dtype: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[PlanVersion]] = relationship(
        back_populates="target", order_by="PlanVersion.version"
    )
    aliases: Mapped[list[PlanAlias]] = relationship(
        back_populates="target", order_by="PlanAlias.name"
    )


class CalibrationJob(Base):
    """A calibration request, idempotent by ``job_key`` (hash of the canonical request)."""

    __tablename__ = "calibration_jobs"
    __table_args__ = (
        CheckConstraint(one_of("status", JOB_STATUSES), name="status"),
        Index(None, "status"),
        Index(None, "model"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_key: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[int | None] = mapped_column(ForeignKey("plan_targets.id"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    request: Mapped[dict[str, Any]]
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Fleet (migration 0003_fleet): the driver holding the job, shard progress, result.
    lease_holder: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any] | None]
    timings: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]


class PlanVersion(Base):
    """One immutable plan of a target: integer version, sha256, size and object key."""

    __tablename__ = "plan_versions"
    __table_args__ = (
        UniqueConstraint("target_id", "version"),
        UniqueConstraint("target_id", "sha256"),
        Index(None, "sha256"),
        CheckConstraint(one_of("status", VERSION_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("plan_targets.id"))
    version: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    object_key: Mapped[str] = mapped_column(String(256))
    format_version: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="ready")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    calibration_job_id: Mapped[int | None] = mapped_column(ForeignKey("calibration_jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # An operator's mark (``mark-stale``; migration 0004_stale): recalibrate this target.
    stale_marked_at: Mapped[datetime | None]
    stale_marked_by: Mapped[str | None] = mapped_column(String(128))
    stale_reason: Mapped[str | None] = mapped_column(Text)

    target: Mapped[PlanTarget] = relationship(back_populates="versions")


class PlanAlias(Base):
    """A movable name (``production``) on a target; ``lock_version`` rejects stale moves."""

    __tablename__ = "plan_aliases"
    __table_args__ = (UniqueConstraint("target_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("plan_targets.id"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("plan_versions.id"))
    lock_version: Mapped[int] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    target: Mapped[PlanTarget] = relationship(back_populates="aliases")
    plan_version: Mapped[PlanVersion] = relationship()

    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": lock_version}


LEASE_KINDS = ("publish", "gc")


class ObjectLease(Base):
    """A claim on a store object while it is written (``publish``) or deleted (``gc``).

    A publish holds one from before it writes the object until the commit that references
    it; gc leaves leased objects alone and holds one while it deletes. See registry/leases.py.
    """

    __tablename__ = "object_leases"
    __table_args__ = (
        Index(None, "object_key"),
        CheckConstraint(one_of("kind", LEASE_KINDS), name="kind"),
        {"sqlite_autoincrement": True},  # an id is never reused: it names one lease
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    object_key: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
