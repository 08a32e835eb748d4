"""Registry operations over the database and the object store.

Writers (``publish``, ``promote``, ``models add``) need the database; after each change the
affected models' index objects (``index/<model>.json``) are rewritten in the store, so that
clients with store read access alone can resolve plans (see :mod:`registry.client`).
"""

from __future__ import annotations

import getpass
import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from invardiff import CachePlan, PlanError, __version__, load_plan
from invardiff.architectures import ARCHITECTURES
from invardiff.official import REFERENCE_TARGETS, is_official
from invardiff.plan import FORMAT_VERSION

from . import db
from .config import Config
from .errors import Conflict, IntegrityFailure, InvalidInput, NotFound, RegistryError
from .index import encode_index, index_key
from .matching import (
    LATEST,
    READY,
    ModelInfo,
    Query,
    Resolution,
    Resolved,
    TargetEntry,
    TargetKey,
    VersionInfo,
    check_finite,
    check_name,
    resolve,
)
from .models import CalibrationJob, ModelAlias, PlanAlias, PlanTarget, PlanVersion, utcnow
from .store import BlobRef, ObjectStore, get_blob, open_store, put_blob

PUBLISH_ATTEMPTS = 10
_MODEL_FIELDS = (
    "pipeline",
    "scheduler",
    "scheduler_config_hash",
    "steps",
    "height",
    "width",
    "guidance",
    "dtype",
)

BUILTIN_MODELS = (
    ModelInfo(
        name="digits-dit",
        source="builtin://digits-dit",
        revision=None,
        arch="dit",
        pipeline="DiTPipeline",
        scheduler="DDIMScheduler",
        steps=50,
        height=16,
        width=16,
        dtype="float32",
    ),
    ModelInfo(
        name="digits-flux",
        source="builtin://digits-flux",
        revision=None,
        arch="flux",
        pipeline="DigitsFluxPipeline",
        scheduler="FlowMatchEulerDiscreteScheduler",
        steps=28,
        height=16,
        width=16,
        dtype="float32",
    ),
)


def checkpoint_id(source: str) -> str:
    """The id a pipeline loads: ``hf://org/name`` -> ``org/name``; other sources unchanged."""
    return source.removeprefix("hf://")


def arch_defaults(arch: str) -> dict[str, Any]:
    """Default pipeline settings of a new model alias: those of the reference checkpoints."""
    target = REFERENCE_TARGETS[arch]
    return {name: getattr(target, name) for name in _MODEL_FIELDS}


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` did: ``created`` is False when the same bytes were already there."""

    created: bool
    model: str
    target: TargetKey
    version: VersionInfo

    def to_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "model": self.model,
            "target": self.target.to_json(),
            **self.version.to_json(),
        }


class Registry:
    """The registry database plus its object store."""

    def __init__(self, engine: Engine, store: ObjectStore) -> None:
        self.engine = engine
        self.store = store

    @classmethod
    def open(cls, config: Config, create: bool = False, check_schema: bool = True) -> Registry:
        """Connect to the configured database and store.

        ``create`` makes a missing SQLite file; ``check_schema`` refuses a database that is
        not at this tool's schema revision.
        """
        store = open_store(config.store_url, config.s3_endpoint_url)
        if not config.database_url:
            raise RegistryError(
                "this command needs the registry database: set INVARDIFF_DATABASE_URL "
                "(with only INVARDIFF_STORE_URL set, the registry can only fetch)"
            )
        engine = db.create(config.database_url, must_exist=not create)
        if check_schema:
            db.check_schema(engine)
        return cls(engine, store)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction; connection failures become :class:`~registry.errors.Unreachable`."""
        with (
            db.reachable(str(self.engine.url)),
            Session(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    # ---- schema and models --------------------------------------------------------------
    def init(self) -> dict[str, Any]:
        """Create or upgrade the schema and register the built-in models."""
        self.store.check_writable()  # before any change: the indexes are written last
        revision = db.upgrade(self.engine)
        added = [m.name for m in BUILTIN_MODELS if self._insert_model(m)]
        self.write_indexes([m.name for m in BUILTIN_MODELS])
        return {"revision": revision, "models_added": added}

    def _insert_model(self, model: ModelInfo) -> bool:
        with self.session() as session:
            if session.scalar(select(ModelAlias.id).where(ModelAlias.name == model.name)):
                return False
            session.add(ModelAlias(**model.to_json()))
        return True

    def add_model(
        self,
        name: str,
        source: str,
        revision: str | None,
        arch: str,
        settings: dict[str, Any],
        update: bool = False,
    ) -> ModelInfo:
        """Register (or with ``update`` repoint) a model alias; defaults come from ``arch``."""
        check_name(name, "model")
        if arch not in ARCHITECTURES:
            raise InvalidInput(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
        if not source.strip():
            raise InvalidInput("the model source must not be empty")
        check_finite(settings.get("guidance"), "guidance")
        values = {**arch_defaults(arch), **{k: v for k, v in settings.items() if v is not None}}
        model = ModelInfo(name=name, source=source, revision=revision, arch=arch, **values)
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
                if row is not None and not update:
                    if _model_info(row) == model:
                        return model
                    raise Conflict(
                        f"model {_model_info(row).describe()} already exists; "
                        "pass --update to change it"
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

    def models(self) -> list[ModelInfo]:
        """All model aliases, by name."""
        with self.session() as session:
            return [
                _model_info(r)
                for r in session.scalars(select(ModelAlias).order_by(ModelAlias.name))
            ]

    def model(self, name: str) -> ModelInfo:
        """One model alias; :class:`NotFound` lists the known ones."""
        with self.session() as session:
            row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
            if row is None:
                known = ", ".join(
                    session.scalars(select(ModelAlias.name).order_by(ModelAlias.name))
                )
                raise NotFound(f"unknown model {name!r}; known models: {known or 'none'}")
            return _model_info(row)

    # ---- publishing ---------------------------------------------------------------------
    def publish(
        self,
        path: str | Path,
        model_name: str,
        resolution: Resolution | None,
        steps: int | None = None,
    ) -> PublishResult:
        """Store a plan file's canonical bytes and register it as a version of its target.

        Idempotent: the same bytes for the same target give the existing version. Concurrent
        publishers race on the database's unique constraints and retry a bounded number of times.
        """
        model = self.model(model_name)
        plan, lineage = _load_for(Path(path), model, resolution, steps)
        data = plan.to_bytes()
        key = TargetKey(
            source=model.source,
            revision=model.revision,
            pipeline=plan.target.pipeline,
            scheduler=plan.target.scheduler,
            scheduler_config_hash=plan.target.scheduler_config_hash,
            steps=plan.steps,
            height=plan.target.height,
            width=plan.target.width,
            guidance=plan.target.guidance,
            dtype=plan.target.dtype,
        )
        metrics = {**plan.summary().to_json(), **_dict(plan.calibration.get("metrics"))}
        blob = put_blob(self.store, data)
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                result = self._register(model, key, blob, metrics, lineage)
                break
            except IntegrityError:
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise Conflict(
                        f"publishing {blob.sha256[:12]} kept conflicting; try again"
                    ) from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        self.write_indexes(self._models_of(key.source, key.revision))  # also heals a missed write
        return result

    def _register(
        self,
        model: ModelInfo,
        key: TargetKey,
        blob: BlobRef,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
    ) -> PublishResult:
        with self.session() as session:
            target = session.scalar(select(PlanTarget).where(PlanTarget.key_hash == key.key_hash))
            if target is None:
                target = PlanTarget(key_hash=key.key_hash, **key.to_json())
                session.add(target)
                session.flush()
            existing = session.scalar(
                select(PlanVersion).where(
                    PlanVersion.target_id == target.id, PlanVersion.sha256 == blob.sha256
                )
            )
            if existing is not None:
                return PublishResult(False, model.name, key, _version_info(existing))
            number = session.scalar(
                select(func.max(PlanVersion.version)).where(PlanVersion.target_id == target.id)
            )
            job_key = lineage["calibration"].get("job_key")
            job_id = (
                session.scalar(select(CalibrationJob.id).where(CalibrationJob.job_key == job_key))
                if isinstance(job_key, str)
                else None
            )
            row = PlanVersion(
                target_id=target.id,
                version=(number or 0) + 1,
                sha256=blob.sha256,
                size=blob.size,
                object_key=blob.key,
                format_version=FORMAT_VERSION,
                status=READY,
                metrics=metrics,
                lineage=lineage,
                calibration_job_id=job_id,
            )
            session.add(row)
            session.flush()
            return PublishResult(True, model.name, key, _version_info(row))

    # ---- reading ------------------------------------------------------------------------
    def entries(self, session: Session, source: str, revision: str | None) -> list[TargetEntry]:
        """All targets of one checkpoint with their versions and aliases."""
        targets = session.scalars(
            select(PlanTarget)
            .where(PlanTarget.source == source, _is(PlanTarget.revision, revision))
            .options(
                selectinload(PlanTarget.versions),
                selectinload(PlanTarget.aliases).selectinload(PlanAlias.plan_version),
            )
            .order_by(PlanTarget.id)
        )
        return [_entry(t) for t in targets]

    def resolve(self, query: Query) -> Resolved:
        """Answer a fetch query from the database."""
        model = self.model(query.model)
        with self.session() as session:
            return resolve(model, query, self.entries(session, model.source, model.revision))

    def versions(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """Every plan version (of one model's checkpoint, or all), by checkpoint, target, version."""
        models = [self.model(model_name)] if model_name else self.models()
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
        model = self.model(model_name) if model_name else None
        with self.session() as session:
            row = self._version_by_ref(session, ref, model)
            target = row.target
            aliases = session.scalars(
                select(PlanAlias).where(
                    PlanAlias.target_id == target.id, PlanAlias.version_id == row.id
                )
            ).all()
            models = session.scalars(
                select(ModelAlias.name).where(
                    ModelAlias.source == target.source, _is(ModelAlias.revision, target.revision)
                )
            ).all()
            latest = _entry(target).latest()
            return {
                "models": sorted(models),
                "target": _target_key(target).to_json(),
                "resolution": f"{target.width}x{target.height}",
                **_version_info(row).to_json(),
                "latest": latest is not None and latest.version == row.version,
                "aliases": {a.name: a.lock_version for a in aliases},
                "metrics": row.metrics,
                "lineage": row.lineage,
                "calibration_job_id": row.calibration_job_id,
                "created_at": _iso(row.created_at),
            }

    def _version_by_ref(
        self, session: Session, ref: str, model: ModelInfo | None = None
    ) -> PlanVersion:
        ref = ref.lower().removeprefix("sha256:")
        if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
            raise InvalidInput(f"plan reference {ref!r}: give at least 6 hex digits of its sha256")
        query = select(PlanVersion).where(PlanVersion.sha256.startswith(ref))
        if model is not None:
            query = query.join(PlanTarget).where(
                PlanTarget.source == model.source, _is(PlanTarget.revision, model.revision)
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

    # ---- aliases ------------------------------------------------------------------------
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
        model = self.model(model_name) if model_name else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = self._version_by_ref(session, ref, model)
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
                    "target": _target_key(row.target).to_json(),
                }
                source, revision = row.target.source, row.target.revision
        except (StaleDataError, IntegrityError):
            raise Conflict(f"alias {alias} was moved concurrently: re-read it and retry") from None
        self.write_indexes(self._models_of(source, revision))
        return result

    # ---- index --------------------------------------------------------------------------
    def _models_of(self, source: str, revision: str | None) -> list[str]:
        with self.session() as session:
            return list(
                session.scalars(
                    select(ModelAlias.name).where(
                        ModelAlias.source == source, _is(ModelAlias.revision, revision)
                    )
                )
            )

    def write_indexes(self, names: list[str]) -> None:
        """Rewrite the store index of each model, holding its row lock while writing.

        Writers serialize on the model rows (``BEGIN IMMEDIATE`` on SQLite), so the last index
        written always reflects every committed change.
        """
        with self.session() as session:
            rows = session.scalars(
                select(ModelAlias)
                .where(ModelAlias.name.in_(names))
                .order_by(ModelAlias.name)
                .with_for_update()
            ).all()
            for row in rows:
                model = _model_info(row)
                entries = self.entries(session, model.source, model.revision)
                self.store.put(index_key(model.name), encode_index(model, entries))

    # ---- maintenance --------------------------------------------------------------------
    def _is_referenced(self, object_key: str) -> bool:
        with self.session() as session:
            return (
                session.scalar(
                    select(PlanVersion.id).where(PlanVersion.object_key == object_key).limit(1)
                )
                is not None
            )

    def verify(self) -> dict[str, Any]:
        """Re-hash every stored plan object; report missing and corrupt ones."""
        with self.session() as session:
            blobs = session.execute(
                select(PlanVersion.object_key, PlanVersion.sha256, PlanVersion.size)
                .distinct()
                .order_by(PlanVersion.sha256)
            ).all()
        failures = []
        for key, sha256, size in blobs:
            try:
                get_blob(self.store, BlobRef(key, sha256, size))
            except NotFound:
                failures.append({"object_key": key, "sha256": sha256, "problem": "missing"})
            except IntegrityFailure as exc:
                failures.append(
                    {"object_key": key, "sha256": sha256, "problem": "corrupt", "detail": str(exc)}
                )
        return {"checked": len(blobs), "ok": len(blobs) - len(failures), "failures": failures}

    def gc(self, min_age: timedelta, dry_run: bool = False) -> dict[str, Any]:
        """Delete plan objects no version references, once older than ``min_age``.

        The age guard protects a concurrent publish between its store write and its commit
        (a publish of bytes already stored refreshes their age where the store allows it).
        Each object is checked again right before it is deleted, so a publish committed
        since the listing keeps its object.
        """
        with self.session() as session:
            referenced = set(session.scalars(select(PlanVersion.object_key)))
        cutoff = datetime.now(timezone.utc) - min_age
        orphans = [
            o for o in self.store.list("plans/") if o.key not in referenced and o.modified <= cutoff
        ]
        if not dry_run:
            deleted = []
            for orphan in orphans:
                if not self._is_referenced(orphan.key):
                    self.store.delete(orphan.key)
                    deleted.append(orphan)
            orphans = deleted
        return {
            "dry_run": dry_run,
            "deleted": [o.key for o in orphans],
            "freed_bytes": sum(o.size for o in orphans),
            "referenced": len(referenced),
        }


# ---- helpers ----------------------------------------------------------------------------
def _load_for(
    path: Path, model: ModelInfo, resolution: Resolution | None, steps: int | None
) -> tuple[CachePlan, dict[str, Any]]:
    """Read a plan file for ``model``: imported reference plans take the model's identity."""
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"cannot read plan {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not valid JSON: {exc}") from None
    imported = is_official(document)
    overrides: dict[str, Any] = {}
    if imported:
        overrides = {"model_id": checkpoint_id(model.source), "revision": model.revision}
        if resolution is not None:
            overrides.update(height=resolution.height, width=resolution.width)
    try:
        plan = load_plan(path, **overrides)
    except PlanError as exc:
        raise InvalidInput(str(exc).splitlines()[0]) from None
    target = plan.target
    if plan.arch != model.arch:
        raise InvalidInput(
            f"{path.name} is a {plan.arch} plan but model {model.name} is {model.arch}"
        )
    if not imported:
        accepted = {model.name, model.source, checkpoint_id(model.source)}
        if target.model_id not in accepted:
            raise InvalidInput(
                f"{path.name} was calibrated for {target.model_id!r}, not for model {model.name} ({model.source})"
            )
        if target.revision is not None and target.revision != model.revision:
            raise InvalidInput(
                f"{path.name} is for revision {target.revision} but model {model.name} is at "
                f"{model.revision or 'no pinned revision'}"
            )
        if target.revision is None and model.revision is not None:
            # Accepting it would let the same bytes land under several revisions.
            raise InvalidInput(
                f"{path.name} records no checkpoint revision but model {model.name} is pinned to "
                f"{model.revision}: recalibrate against that revision, or set the plan's "
                f"target.revision to {model.revision} if it was calibrated on it"
            )
    if target.guidance is not None and not math.isfinite(target.guidance):
        raise InvalidInput(f"{path.name} records a non-finite guidance ({target.guidance})")
    if target.height is None or target.width is None:
        raise InvalidInput(f"{path.name} records no resolution; publish needs one")
    recorded = Resolution(width=target.width, height=target.height)
    if resolution is not None and resolution != recorded:
        raise InvalidInput(f"--resolution {resolution} does not match the plan's {recorded}")
    if steps is not None and steps != plan.steps:
        raise InvalidInput(f"--steps {steps} does not match the plan's {plan.steps} steps")
    lineage = {
        "source_file": path.name,
        "imported": imported,
        "model_alias": model.name,
        "calibration": plan.calibration,
        "published_by": _user(),
        "published_at": _iso(utcnow()),
        "invardiff_version": __version__,
    }
    return plan, lineage


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is(column, value):
    """``column = value`` that also matches NULL to None."""
    return column.is_(None) if value is None else column == value


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite returns naive values of UTC timestamps
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


def _model_info(row: ModelAlias) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(row, f.name) for f in fields(ModelInfo)})


def _target_key(row: PlanTarget) -> TargetKey:
    return TargetKey(**{name: getattr(row, name) for name in TargetKey.__dataclass_fields__})


def _version_info(row: PlanVersion) -> VersionInfo:
    return VersionInfo(
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        object_key=row.object_key,
        status=row.status,
        format_version=row.format_version,
    )


def _entry(target: PlanTarget) -> TargetEntry:
    return TargetEntry(
        key=_target_key(target),
        versions=tuple(_version_info(v) for v in target.versions),
        aliases={a.name: a.plan_version.version for a in target.aliases},
    )
