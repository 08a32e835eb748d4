"""Object leases: publish and gc never delete what the other is about to reference.

A publish writes its object before the transaction that references it commits; gc deletes
objects no committed version references. Without coordination gc can delete an object
between a publish's write (an S3 "already there" write changes nothing) and its commit. The
protocol, with each step one short transaction serialized per object key (a PostgreSQL
advisory lock; SQLite serializes every write transaction), and no store I/O inside one:

- publish: wait while a live ``gc`` lease holds the key, then take a ``publish`` lease;
  write (or check and repair) the object; in the transaction that inserts the version,
  consume the lease (:class:`LeaseLost` when gc took it over after it expired: start again).
- gc: in one transaction, skip the key when a version references it or a live lease holds
  it, else drop its expired leases and take a ``gc`` lease; check the lease is still fresh;
  delete the object; release the lease.

A lease is live for ``INVARDIFF_LEASE_TTL`` seconds (default 600), so a killed command's
lease delays gc (or a publish of that object) by at most that long.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from .errors import Conflict
from .models import ObjectLease, PlanVersion
from .stamps import aware, utcnow
from .timeouts import lease_ttl

Sessions = Callable[[], AbstractContextManager[Session]]
LOCK_SPACE = 0x1D1F  # first key of the two-key PostgreSQL advisory locks taken here
WAIT_STEP = 0.1


class LeaseLost(Exception):
    """A publish's lease expired and gc took the object over: the publish must start again."""


def _lock(session: Session, key: str) -> None:
    """Serialize this transaction with every other one on ``key`` (until it ends)."""
    if session.get_bind().dialect.name == "postgresql":
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big", signed=True)
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": LOCK_SPACE, "key": number},
        )


def _age(lease: ObjectLease) -> float:
    return (utcnow() - aware(lease.created_at)).total_seconds()


def _live_leases(session: Session, key: str, ttl: float) -> list[ObjectLease]:
    """The key's live leases; expired ones are deleted."""
    live = []
    for lease in session.scalars(select(ObjectLease).where(ObjectLease.object_key == key)):
        if _age(lease) < ttl:
            live.append(lease)
        else:
            session.delete(lease)
    return live


def begin_publish(sessions: Sessions, key: str) -> int:
    """Take a publish lease on ``key`` once no gc holds it; its id."""
    ttl = lease_ttl()
    deadline = time.monotonic() + ttl
    while True:
        with sessions() as session:
            _lock(session, key)
            if all(lease.kind != "gc" for lease in _live_leases(session, key, ttl)):
                lease = ObjectLease(object_key=key, kind="publish")
                session.add(lease)
                session.flush()
                return lease.id
        if time.monotonic() > deadline:
            raise Conflict(f"gc kept {key} claimed for {ttl:g} s; try again")
        time.sleep(WAIT_STEP)


def end_publish(session: Session, key: str, lease_id: int) -> None:
    """Consume the publish lease inside the transaction that references ``key``."""
    _lock(session, key)
    lease = session.get(ObjectLease, lease_id)
    if lease is None or (lease.kind, lease.object_key) != ("publish", key):
        raise LeaseLost(key)
    session.delete(lease)


def claim_for_gc(sessions: Sessions, key: str) -> int | None:
    """A gc lease on ``key`` when nothing references or holds it, else None."""
    ttl = lease_ttl()
    with sessions() as session:
        _lock(session, key)
        referenced = session.scalar(
            select(PlanVersion.id).where(PlanVersion.object_key == key).limit(1)
        )
        if referenced is not None or _live_leases(session, key, ttl):
            return None
        lease = ObjectLease(object_key=key, kind="gc")
        session.add(lease)
        session.flush()
        return lease.id


def gc_may_delete(sessions: Sessions, key: str, lease_id: int) -> bool:
    """Whether gc's lease is still there and young enough (under half the TTL) to delete."""
    with sessions() as session:
        _lock(session, key)
        lease = session.get(ObjectLease, lease_id)
        if lease is None or (lease.kind, lease.object_key) != ("gc", key):
            return False
        return _age(lease) < lease_ttl() / 2


def drop_expired(sessions: Sessions) -> None:
    """Delete every expired lease (those of killed commands)."""
    cutoff = utcnow() - timedelta(seconds=lease_ttl())
    with sessions() as session:
        session.execute(delete(ObjectLease).where(ObjectLease.created_at < cutoff))


def release(sessions: Sessions, lease_id: int) -> None:
    """Drop a lease (gone already is fine)."""
    with sessions() as session:
        session.execute(delete(ObjectLease).where(ObjectLease.id == lease_id))
