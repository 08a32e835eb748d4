"""Registry operations over the database and the object store.

Writers (``publish``, ``promote``, ``models add``) need the database; after each change the
affected models' index objects (``index/<model>.json``) are rewritten in the store, so that
clients with store read access alone can resolve plans (see :mod:`registry.client`).
"""

from __future__ import annotations

import getpass
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from invardiff import CachePlan, PlanError, __version__
from invardiff.architectures import ARCHITECTURES
from invardiff.official import REFERENCE_TARGETS, from_official, is_official
from invardiff.plan import FORMAT_VERSION

from . import db, jobs, leases
from .config import Config
from .errors import (
    Conflict,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    RegistryError,
    Unreachable,
)
from .faults import crash_point
from .index import encode_index, index_key
from .matching import (
    FAILED_GATE,
    LATEST,
    READY,
    REVOKED,
    ModelInfo,
    Query,
    Resolution,
    Resolved,
    TargetEntry,
    TargetKey,
    VersionInfo,
    resolve,
)
from .models import CalibrationJob, ModelAlias, PlanAlias, PlanTarget, PlanVersion, utcnow
from .store import (
    BlobRef,
    MissingObject,
    ObjectInfo,
    ObjectStore,
    blob_ref,
    get_blob,
    open_store,
    put_blob,
)
from .validation import (
    check_min_age,
    check_name,
    check_plan_ref,
    check_settings,
    check_target,
    check_text,
    parse_json,
    read_plan_file,
)

PUBLISH_ATTEMPTS = 10
INDEX_ATTEMPTS = 5
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

# A plan target's own settings; its steps are the plan's (the length of its step gate).
_TARGET_SETTINGS = tuple(name for name in _MODEL_FIELDS if name != "steps")

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


def guess_arch(source: str) -> str | None:
    """The architecture ``source`` names (``dit`` or ``flux``), None unless exactly one."""
    found = [arch for arch in ARCHITECTURES if arch in source.lower()]
    return found[0] if len(found) == 1 else None


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
            db.guarded(self.engine),
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
        unknown = set(given) - set(_MODEL_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        given = check_settings({"source": source, "revision": revision, **given})  # bad: exit 2
        source, revision = given.pop("source"), given.pop("revision")
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
                current = None if row is None else _model_info(row)
                model = _new_model_info(name, source, revision, arch, given, current, update)
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

    def models(self) -> list[ModelInfo]:
        """All model aliases, by name."""
        with self.session() as session:
            return [
                _model_info(r)
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
            return _model_info(row)

    # ---- publishing ---------------------------------------------------------------------
    def publish(
        self,
        path: str | Path,
        model_name: str,
        resolution: Resolution | None,
        steps: int | None = None,
        status: str = READY,
    ) -> PublishResult:
        """Store a plan file's canonical bytes and register it as a version of its target.

        ``status`` is ``ready``, or ``failed_gate`` for a plan below its quality gate: recorded
        with its metrics, never served (not ``latest``, not an alias, not in the index).
        Idempotent: the same bytes for the same target give the existing version (whose status
        stays as it is). Concurrent
        publishers race on the database's unique constraints and retry a bounded number of times.
        A lease keeps gc off the object from before it is written until the version that
        references it commits (see :mod:`registry.leases`); a damaged copy already in the
        store is replaced.
        """
        if status not in (READY, FAILED_GATE):
            raise InvalidInput(f"a plan is published ready or failed_gate, not {status!r}")
        model = self.model(model_name)
        plan, lineage = _load_for(Path(path), model, resolution, steps)
        data = plan.to_bytes()
        key = _plan_target_key(model, plan)
        metrics = {**plan.summary().to_json(), **_dict(plan.calibration.get("metrics"))}
        blob = blob_ref(data)
        self.store.check_writable()  # an unwritable store fails before the database changes
        lease = None
        try:
            for attempt in range(PUBLISH_ATTEMPTS):
                if lease is None:
                    lease = leases.begin_publish(self.session, blob.key)
                    crash_point("publish.leased")
                    put_blob(self.store, data)
                    crash_point("publish.stored")
                try:
                    result = self._register(model, key, blob, metrics, lineage, lease, status)
                    lease = None  # consumed by the commit
                    break
                except (IntegrityError, leases.LeaseLost) as exc:
                    if attempt == PUBLISH_ATTEMPTS - 1:
                        raise Conflict(
                            f"publishing {blob.sha256[:12]} kept conflicting; try again"
                        ) from None
                    if isinstance(exc, leases.LeaseLost):
                        lease = None  # gc took the object over: write it again
                    time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        finally:
            if lease is not None:  # failed: leave nothing behind (else it expires)
                with suppress(RegistryError):
                    leases.release(self.session, lease)
        crash_point("publish.committed")
        self.write_indexes(self._models_of(key.source))  # also heals a missed write
        return result

    def _register(
        self,
        model: ModelInfo,
        key: TargetKey,
        blob: BlobRef,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        lease: int,
        status: str,
    ) -> PublishResult:
        with self.session() as session:
            leases.end_publish(session, blob.key, lease)
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
                status=status,
                metrics=metrics,
                lineage=lineage,
                calibration_job_id=job_id,
            )
            session.add(row)
            session.flush()
            return PublishResult(True, model.name, key, _version_info(row))

    # ---- reading ------------------------------------------------------------------------
    def entries(
        self, session: Session, source: str, revision: str | None, any_revision: bool = False
    ) -> list[TargetEntry]:
        """All targets of one checkpoint (``any_revision``: of its source) with their versions
        and aliases, oldest target first."""
        where = [PlanTarget.source == source]
        if not any_revision:
            where.append(_is(PlanTarget.revision, revision))
        targets = session.scalars(
            select(PlanTarget)
            .where(*where)
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
        self, session: Session, ref: str, model: ModelInfo | None = None, lock: bool = False
    ) -> PlanVersion:
        """The version whose sha256 starts with ``ref``; ``lock`` holds its row until commit."""
        ref = check_plan_ref(ref)
        query = select(PlanVersion).where(PlanVersion.sha256.startswith(ref))
        if lock:
            query = query.with_for_update()
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
        model = self.model(model_name) if model_name is not None else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        try:
            with self.session() as session:
                row = self._version_by_ref(session, ref, model, lock=True)  # vs. a revoke
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
                source = row.target.source
        except (StaleDataError, IntegrityError):
            raise Conflict(f"alias {alias} was moved concurrently: re-read it and retry") from None
        self.write_indexes(self._models_of(source))
        return result

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
            row = self._version_by_ref(session, ref, model, lock=True)
            changed = row.status == FAILED_GATE
            if changed:
                row.status = READY
                row.lineage = {**row.lineage, "admitted": {"by": _user(), "at": _iso(utcnow()),
                                                           "gate": gate}}  # fmt: skip
            info = _version_info(row)
            source = row.target.source
        if changed:
            self.write_indexes(self._models_of(source))
        return info

    def revoke(self, ref: str, model_name: str | None = None) -> dict[str, Any]:
        """Take a plan version out of service for good (idempotent).

        A revoked version is never served: not as ``latest``, not through an alias (which
        stays, pointing at it, until promoted elsewhere) and not in the store index.
        """
        model = self.model(model_name) if model_name is not None else None
        self.store.check_writable()  # an unreachable store must fail before the commit
        with self.session() as session:
            row = self._version_by_ref(session, ref, model, lock=True)
            changed = row.status != REVOKED
            if changed:
                row.status = REVOKED
                row.lineage = {**row.lineage, "revoked_by": _user(), "revoked_at": _iso(utcnow())}
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
                "target": _target_key(row.target).to_json(),
            }
            source = row.target.source
        self.write_indexes(self._models_of(source))
        return result

    # ---- index --------------------------------------------------------------------------
    def _models_of(self, source: str) -> list[str]:
        """The model aliases of a checkpoint source, whose indexes a change to it touches (an
        index also holds the aliased plans of the source's other revisions)."""
        with self.session() as session:
            return list(session.scalars(select(ModelAlias.name).where(ModelAlias.source == source)))

    def index_bytes(self, name: str) -> bytes | None:
        """The index document the database gives for model ``name`` (None: no such model)."""
        with self.session() as session:
            row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
            if row is None:
                return None
            model = _model_info(row)
            entries = self.entries(session, model.source, model.revision, any_revision=True)
            served = [  # ready versions only; of other revisions only aliased ones (rule 6)
                s
                for e in entries
                if (s := e.servable() if e.key.revision == model.revision else e.aliased())
            ]
            return encode_index(model, served)

    def write_indexes(self, names: list[str]) -> None:
        """Rewrite the store index of each model, outside any database transaction.

        After writing, the index is computed again: when a concurrent change committed
        meanwhile (and a slower writer may have put older bytes), it is written again, so the
        last index written reflects every committed change. A store failure says that the
        change itself is committed and how to repair the index.
        """
        for name in sorted(set(names)):
            data = self.index_bytes(name)
            for _ in range(INDEX_ATTEMPTS):
                if data is None:
                    break
                try:
                    self.store.put(index_key(name), data)
                except Unreachable as exc:
                    raise Unreachable(
                        f"{exc}; the change is committed but the store index of {name} is not "
                        "updated: run `invardiff-registry index rebuild` once the store is back"
                    ) from None
                written, data = data, self.index_bytes(name)
                if data == written:
                    break

    def check_indexes(self, rebuild: bool = False) -> dict[str, Any]:
        """Compare every model's store index with the database; ``rebuild`` rewrites bad ones.

        Returns ``{"checked", "failures": [{"object_key", "problem": "missing index"|"stale
        index"}], "rewritten": [keys]}``.
        """
        failures, rewritten = [], []
        names = [m.name for m in self.models()]
        for name in names:
            key = index_key(name)
            try:
                stored = self.store.get(key)
            except NotFound:
                stored = None
            if stored == self.index_bytes(name):
                continue
            problem = "missing index" if stored is None else "stale index"
            failures.append({"object_key": key, "problem": problem})
            if rebuild:
                self.write_indexes([name])
                rewritten.append(key)
        return {"checked": len(names), "failures": failures, "rewritten": rewritten}

    # ---- maintenance --------------------------------------------------------------------
    def verify(self) -> dict[str, Any]:
        """Re-hash every stored plan object and compare every index with the database.

        Reports missing and corrupt objects, and missing or stale indexes (a crash or a lost
        store between a commit and its index write; ``index rebuild`` repairs them).
        """
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
            except MissingObject:
                failures.append({"object_key": key, "sha256": sha256, "problem": "missing"})
            except IntegrityFailure as exc:
                failures.append(
                    {"object_key": key, "sha256": sha256, "problem": "corrupt", "detail": str(exc)}
                )
        ok = len(blobs) - len(failures)
        indexes = self.check_indexes()
        failures.extend(indexes["failures"])
        return {
            "checked": len(blobs),
            "ok": ok,
            "indexes_checked": indexes["checked"],
            "failures": failures,
        }

    def gc(
        self,
        min_age: timedelta,
        dry_run: bool = False,
        failed_job_age: timedelta = jobs.DEFAULT_FAILED_JOB_AGE,
    ) -> dict[str, Any]:
        """Delete plan objects no version references, once older than ``min_age``.

        An object a publish holds a lease on is kept (see :mod:`registry.leases`), and each
        one is checked again, under its own lease, right before it is deleted. Temporary
        files of killed writers (local stores) older than ``min_age`` are removed too, and
        the statistics (``jobs/<key>/``) of calibration jobs that failed more than
        ``failed_job_age`` ago (the job rows stay; a rerun computes them afresh).
        """
        check_min_age(min_age)
        check_min_age(failed_job_age, "--failed-job-age")
        if not dry_run:
            leases.drop_expired(self.session)
        with self.session() as session:
            referenced = set(session.scalars(select(PlanVersion.object_key)))
        cutoff = datetime.now(timezone.utc) - min_age
        orphans = [
            o for o in self.store.list("plans/") if o.key not in referenced and o.modified <= cutoff
        ]
        if not dry_run:
            orphans = [o for o in orphans if self._delete_orphan(o.key)]
        temporaries = self.store.remove_temporaries(cutoff, dry_run)
        failed, statistics = self._gc_failed_jobs(failed_job_age, dry_run)
        return {
            "dry_run": dry_run,
            "deleted": [o.key for o in orphans],
            "temporaries": [t.key for t in temporaries],
            "failed_jobs": failed,
            "job_objects": [o.key for o in statistics],
            "freed_bytes": sum(o.size for o in [*orphans, *temporaries, *statistics]),
            "referenced": len(referenced),
        }

    def _gc_failed_jobs(self, age: timedelta, dry_run: bool) -> tuple[list[str], list[ObjectInfo]]:
        """The statistics of jobs failed more than ``age`` ago, deleted unless ``dry_run``."""
        cutoff = datetime.now(timezone.utc) - age
        dropped: list[str] = []
        objects: list[ObjectInfo] = []
        for key in jobs.failed_before(self, cutoff):
            found = list(self.store.list(f"jobs/{key}/"))
            if not found:
                continue
            if not dry_run and not jobs.drop_failed_statistics(
                self, key, cutoff, lambda found=found: self._delete_all(found)
            ):
                continue
            dropped.append(key)
            objects.extend(found)
        return dropped, objects

    def _delete_all(self, objects: list[ObjectInfo]) -> None:
        for info in objects:
            self.store.delete(info.key)

    def _delete_orphan(self, key: str) -> bool:
        """Delete ``key`` under a gc lease when nothing references or leases it."""
        lease = leases.claim_for_gc(self.session, key)
        if lease is None:
            return False
        crash_point("gc.claimed")
        try:
            if not leases.gc_may_delete(self.session, key, lease):
                return False
            self.store.delete(key)
            crash_point("gc.deleted")
        finally:
            leases.release(self.session, lease)
        return True


# ---- helpers ----------------------------------------------------------------------------
def _new_model_info(
    name: str,
    source: str,
    revision: str | None,
    arch: str | None,
    given: dict[str, Any],
    current: ModelInfo | None,
    update: bool,
) -> ModelInfo:
    """The validated alias ``add_model`` writes (see there for what ``update`` keeps)."""
    if update and current is not None:
        arch = arch or current.arch
        kept = {n: getattr(current, n) for n in _MODEL_FIELDS}
        base = kept if arch == current.arch else arch_defaults(arch)
        revision = current.revision if revision is None else revision
    else:
        arch = arch or guess_arch(source)
        if arch is None:
            raise InvalidInput(
                "cannot tell the architecture from SOURCE: pass --arch dit or --arch flux"
            )
        base = arch_defaults(arch)
    values = check_settings({"source": source, "revision": revision, **base, **given})
    return ModelInfo(name=name, arch=arch, **values)


def _load_for(
    path: Path, model: ModelInfo, resolution: Resolution | None, steps: int | None
) -> tuple[CachePlan, dict[str, Any]]:
    """Read a plan file for ``model``: imported reference plans take the model's identity.

    The file is read bounded (see :func:`registry.validation.read_plan_file`) and its target
    made canonical, so that equal targets are one target whatever the JSON spelled.
    """
    document = parse_json(read_plan_file(path), str(path))
    imported = is_official(document)
    overrides: dict[str, Any] = {}
    if imported:
        overrides = {"model_id": checkpoint_id(model.source), "revision": model.revision}
        if resolution is not None:
            overrides.update(height=resolution.height, width=resolution.width)
    try:
        if imported:
            plan = from_official(document, name=path.stem, **overrides)
        else:
            plan = CachePlan.from_json(document)
    except (PlanError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"{path}: {detail}") from None
    plan = _canonical(plan, path)
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


def _canonical(plan: CachePlan, path: Path) -> CachePlan:
    """The plan with a validated, canonical target (``1024.0`` -> ``1024``); refuses bad values."""
    target = plan.target
    try:
        check_text(target.model_id, "target.model_id", 512)
        values = check_settings(
            {name: getattr(target, name) for name in ("revision", *_TARGET_SETTINGS)}
        )
        if not isinstance(plan.calibration, dict) or not isinstance(plan.extras, dict):
            raise InvalidInput("calibration and extras must be JSON objects")
        job_key = plan.calibration.get("job_key")
        if job_key is not None:
            check_text(job_key, "calibration.job_key", 64)
    except InvalidInput as exc:
        raise InvalidInput(f"{path.name}: {exc}") from None
    plan = replace(plan, target=replace(target, **values))
    try:
        plan.to_bytes()
    except (ValueError, TypeError) as exc:  # e.g. a timestep written as "inf"
        raise InvalidInput(f"{path.name}: cannot be stored as canonical JSON: {exc}") from None
    return plan


def _plan_target_key(model: ModelInfo, plan: CachePlan) -> TargetKey:
    """The validated, canonical matching key of ``plan`` published for ``model``."""
    settings = {name: getattr(plan.target, name) for name in _TARGET_SETTINGS}
    values = check_target(
        {"source": model.source, "revision": model.revision, **settings, "steps": plan.steps}
    )
    return TargetKey(**values)


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
