"""Changes to what is served: the schema and model aliases (``init``, ``models add``), plan
aliases (``promote``) and a version's status (``admit``, ``revoke``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from invardiff.architectures import ARCHITECTURES

from . import db
from .checkpoints import BUILTIN_MODELS, MODEL_FIELDS, new_model_info
from .errors import Conflict, InvalidInput
from .indexing import Indexed
from .matching import FAILED_GATE, LATEST, READY, REVOKED, ModelInfo, VersionInfo
from .models import ModelAlias, PlanAlias
from .rows import model_info, target_key, version_info
from .stamps import iso, user, utcnow
from .validation import check_name, check_settings


class Aliases(Indexed):
    """Model aliases, plan aliases and version status."""

    def init(self) -> dict[str, Any]:
        """Create or upgrade the schema and register the built-in models."""
        self.store.check_writable()  # before any change: the indexes are written last
        revision = db.upgrade(self.engine)
        added = [m.name for m in BUILTIN_MODELS if self._insert_model(m)]
        self.write_indexes([m.name for m in BUILTIN_MODELS])
        return {"revision": revision, "models_added": added}

    def _insert_model(self, model: ModelInfo) -> bool:
        try:
            with self.session() as session:
                if session.scalar(select(ModelAlias.id).where(ModelAlias.name == model.name)):
                    return False
                session.add(ModelAlias(**model.to_json()))
        except IntegrityError:  # a concurrent init added it
            return False
        return True

    def add_model(
        self,
        name: str,
        source: str,
        revision: str | None,
        arch: str | None,
        settings: dict[str, Any],
        update: bool = False,
    ) -> ModelInfo:
        """Register a model alias, or with ``update`` change an existing one.

        A new alias takes its defaults from ``arch`` (guessed from ``source`` when None and it
        names exactly one architecture). ``update`` changes only what is given: ``revision``,
        ``arch`` and settings left None keep the alias's values (another ``arch`` starts from
        its defaults).
        """
        check_name(name, "model")
        if arch is not None and arch not in ARCHITECTURES:
            raise InvalidInput(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
        given = {k: v for k, v in settings.items() if v is not None}
        unknown = set(given) - set(MODEL_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        given = check_settings({"source": source, "revision": revision, **given})  # bad: exit 2
        source, revision = given.pop("source"), given.pop("revision")
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
                current = None if row is None else model_info(row)
                model = new_model_info(name, source, revision, arch, given, current, update)
                if current is not None and not update:
                    if current == model:
                        return model
                    raise Conflict(
                        f"model {current.describe()} already exists; pass --update to change it"
                    )
                if row is None:
                    session.add(ModelAlias(**model.to_json()))
                else:
                    for key, value in model.to_json().items():
                        setattr(row, key, value)
        except IntegrityError:
            raise Conflict(f"model {name} was added concurrently; run the command again") from None
        self.write_indexes([name])
        return model

    def promote(
        self, ref: str, alias: str, expect: int | None = None, model_name: str | None = None
    ) -> dict[str, Any]:
        """Point ``alias`` of the plan's target at the plan.

        ``expect`` is the alias's lock version the caller last read (0: must not exist yet);
        a different current value, or a concurrent move, raises :class:`Conflict`.
        ``model_name`` picks the checkpoint when the same plan is published for several.
        """
        check_name(alias, "alias")
        if alias == LATEST:
            raise InvalidInput("'latest' is computed (highest ready version) and cannot be moved")
        model = self.model(model_name) if model_name is not None else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = self.version_by_ref(session, ref, model, lock=True)  # vs. a revoke
                if row.status != READY:
                    raise InvalidInput(
                        f"plan {row.sha256[:12]} is {row.status}, only ready plans can be promoted"
                    )
                current = session.scalar(
                    select(PlanAlias).where(
                        PlanAlias.target_id == row.target_id, PlanAlias.name == alias
                    )
                )
                seen = current.lock_version if current else 0
                if expect is not None and expect != seen:
                    raise Conflict(
                        f"alias {alias} is at lock version {seen}, not {expect}: it moved since you read it"
                    )
                previous = current.plan_version.version if current else None
                if current is None:
                    current = PlanAlias(target_id=row.target_id, name=alias, version_id=row.id)
                    session.add(current)
                elif current.version_id != row.id:
                    current.version_id = row.id
                session.flush()
                result = {
                    "alias": alias,
                    "sha256": row.sha256,
                    "version": row.version,
                    "previous_version": previous,
                    "lock_version": current.lock_version,
                    "target": target_key(row.target).to_json(),
                }
                source = row.target.source
        except (StaleDataError, IntegrityError):
            raise Conflict(f"alias {alias} was moved concurrently: re-read it and retry") from None
        self.write_indexes(self.models_of(source))
        return result


    def admit(self, ref: str, gate: dict[str, Any], model_name: str | None = None) -> VersionInfo:
        """Put a ``failed_gate`` version into service: it passed ``gate``, explicit thresholds.

        A gate can admit a plan, never withdraw one (``revoke`` does that): other statuses are
        returned unchanged.
        """
        thresholds = gate.get("min_psnr") is not None or gate.get("min_speedup") is not None
        if not (gate.get("passed") and thresholds):
            raise InvalidInput(
                "only a gate with --min-psnr/--min-speedup that passed admits a plan"
            )
        model = self.model(model_name) if model_name is not None else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        with self.session() as session:
            row = self.version_by_ref(session, ref, model, lock=True)
            changed = row.status == FAILED_GATE
            if changed:
                row.status = READY
                row.lineage = {**row.lineage, "admitted": {"by": user(), "at": iso(utcnow()),
                                                           "gate": gate}}  # fmt: skip
            info = version_info(row)
            source = row.target.source
        if changed:
            self.write_indexes(self.models_of(source))
        return info

    def revoke(self, ref: str, model_name: str | None = None) -> dict[str, Any]:
        """Take a plan version out of service for good (idempotent).

        A revoked version is never served: not as ``latest``, not through an alias (which
        stays, pointing at it, until promoted elsewhere) and not in the store index.
        """
        model = self.model(model_name) if model_name is not None else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        with self.session() as session:
            row = self.version_by_ref(session, ref, model, lock=True)
            changed = row.status != REVOKED
            if changed:
                row.status = REVOKED
                row.lineage = {**row.lineage, "revoked_by": user(), "revoked_at": iso(utcnow())}
            aliases = session.scalars(
                select(PlanAlias.name)
                .where(PlanAlias.version_id == row.id)
                .order_by(PlanAlias.name)
            ).all()
            result = {
                "sha256": row.sha256,
                "version": row.version,
                "status": REVOKED,
                "changed": changed,
                "aliases": list(aliases),
                "target": target_key(row.target).to_json(),
            }
            source = row.target.source
        self.write_indexes(self.models_of(source))
        return result

