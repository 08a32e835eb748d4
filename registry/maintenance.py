"""Maintenance: ``verify`` (re-hash every stored plan, compare the indexes) and ``gc``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from . import jobs, leases
from .errors import IntegrityFailure
from .faults import crash_point
from .indexing import Indexed
from .models import PlanVersion
from .store import BlobRef, MissingObject, ObjectInfo, get_blob
from .validation import check_min_age


class Maintenance(Indexed):
    """Checks and clean-up of the store against the database."""

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


