"""The read side over the database: model aliases, targets, versions and fetch answers.

:class:`Reader` is what ``fetch`` with a database uses (:mod:`registry.client`): it writes
nothing, neither to the database nor to the store.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from .connection import Connection
from .errors import InvalidInput, NotFound
from .matching import ModelInfo, Query, Resolved, TargetEntry, TargetKey, resolve
from .models import ModelAlias, PlanAlias, PlanTarget, PlanVersion
from .rows import equals, model_info, target_entry, target_key, version_info
from .stamps import iso
from .validation import check_name, check_plan_ref


class Reader(Connection):
    """Queries over the registry database."""

    def models(self) -> list[ModelInfo]:
        """All model aliases, by name."""
        with self.session() as session:
            return [
                model_info(r)
                for r in session.scalars(select(ModelAlias).order_by(ModelAlias.name))
            ]

    def model(self, name: str) -> ModelInfo:
        """One model alias; :class:`NotFound` lists the known ones."""
        check_name(name, "model")
        with self.session() as session:
            row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
            if row is None:
                known = ", ".join(
                    session.scalars(select(ModelAlias.name).order_by(ModelAlias.name))
                )
                raise NotFound(f"unknown model {name!r}; known models: {known or 'none'}")
            return model_info(row)

    # ---- reading ------------------------------------------------------------------------
    def entries(
        self, session: Session, source: str, revision: str | None, any_revision: bool = False
    ) -> list[TargetEntry]:
        """All targets of one checkpoint (``any_revision``: of its source) with their versions
        and aliases, oldest target first."""
        where = [PlanTarget.source == source]
        if not any_revision:
            where.append(equals(PlanTarget.revision, revision))
        targets = session.scalars(
            select(PlanTarget)
            .where(*where)
            .options(
                selectinload(PlanTarget.versions),
                selectinload(PlanTarget.aliases).selectinload(PlanAlias.plan_version),
            )
            .order_by(PlanTarget.id)
        )
        return [target_entry(t) for t in targets]

    def resolve(self, query: Query) -> Resolved:
        """Answer a fetch query from the database."""
        model = self.model(query.model)
        with self.session() as session:
            entries = self.entries(session, model.source, model.revision, any_revision=True)
            return resolve(model, query, entries)

    def versions(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """Every plan version (of one model's checkpoint, or all), by checkpoint, target, version."""
        models = [self.model(model_name)] if model_name is not None else self.models()
        rows = []
        with self.session() as session:
            metrics = {
                (key_hash, number): stored
                for key_hash, number, stored in session.execute(
                    select(PlanTarget.key_hash, PlanVersion.version, PlanVersion.metrics).join(
                        PlanVersion.target
                    )
                )
            }
            for checkpoint in sorted({(m.source, m.revision) for m in models}, key=str):
                names = sorted(m.name for m in models if (m.source, m.revision) == checkpoint)
                for entry in self.entries(session, *checkpoint):
                    for version in entry.versions:
                        aliases = sorted(
                            a for a, n in entry.aliases.items() if n == version.version
                        )
                        rows.append(
                            {
                                "models": names,
                                "target": entry.key.to_json(),
                                "resolution": str(entry.key.resolution),
                                **version.to_json(),
                                "aliases": aliases,
                                "latest": version == entry.latest(),
                                "metrics": metrics[(entry.key.key_hash, version.version)],
                            }
                        )
        return rows

    def show(self, ref: str, model_name: str | None = None) -> dict[str, Any]:
        """Everything about one plan version (by sha256 prefix; ``model_name`` disambiguates)."""
        model = self.model(model_name) if model_name is not None else None
        with self.session() as session:
            row = self.version_by_ref(session, ref, model)
            target = row.target
            aliases = session.scalars(
                select(PlanAlias).where(
                    PlanAlias.target_id == target.id, PlanAlias.version_id == row.id
                )
            ).all()
            models = session.scalars(
                select(ModelAlias.name).where(
                    ModelAlias.source == target.source, equals(ModelAlias.revision, target.revision)
                )
            ).all()
            latest = target_entry(target).latest()
            return {
                "models": sorted(models),
                "target": target_key(target).to_json(),
                "resolution": f"{target.width}x{target.height}",
                **version_info(row).to_json(),
                "latest": latest is not None and latest.version == row.version,
                "aliases": {a.name: a.lock_version for a in aliases},
                "metrics": row.metrics,
                "lineage": row.lineage,
                "calibration_job_id": row.calibration_job_id,
                "created_at": iso(row.created_at),
            }

    def version_by_ref(
        self, session: Session, ref: str, model: ModelInfo | None = None, lock: bool = False
    ) -> PlanVersion:
        """The version whose sha256 starts with ``ref``; ``lock`` holds its row until commit."""
        ref = check_plan_ref(ref)
        query = select(PlanVersion).where(PlanVersion.sha256.startswith(ref))
        if lock:
            query = query.with_for_update()
        if model is not None:
            query = query.join(PlanTarget).where(
                PlanTarget.source == model.source, equals(PlanTarget.revision, model.revision)
            )
        rows = session.scalars(
            query.options(selectinload(PlanVersion.target)).order_by(PlanVersion.id).limit(2)
        ).all()
        if not rows:
            of = f" for model {model.name}" if model else ""
            raise NotFound(
                f"no plan with sha256 starting {ref}{of}; `invardiff-registry list` shows them"
            )
        if len(rows) > 1 and rows[0].sha256 == rows[1].sha256:
            raise InvalidInput(
                f"plan {rows[0].sha256[:12]} is published for several checkpoints: "
                "pass --model to choose one"
            )
        if len(rows) > 1:
            raise InvalidInput(f"plan reference {ref} is ambiguous: give more hex digits")
        return rows[0]


    def version_status(self, sha256: str, target: TargetKey) -> str:
        """The status of the version with ``sha256`` of ``target`` (whatever alias names it)."""
        with self.session() as session:
            status = session.scalar(
                select(PlanVersion.status)
                .join(PlanVersion.target)
                .where(PlanTarget.key_hash == target.key_hash, PlanVersion.sha256 == sha256)
            )
        if status is None:
            raise NotFound(f"no plan {sha256[:12]} for {target.describe()}")
        return status

