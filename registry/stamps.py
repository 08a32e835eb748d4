"""Who and when a change records: the user's name and UTC timestamps in ISO 8601."""

from __future__ import annotations

import getpass
from datetime import datetime, timezone


def utcnow() -> datetime:
    """Timezone-aware now (the default of every timestamp column)."""
    return datetime.now(timezone.utc)


def aware(moment: datetime | None) -> datetime | None:
    """``moment`` as an aware UTC time (SQLite returns naive values of UTC timestamps)."""
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def iso(moment: datetime | None) -> str | None:
    """``moment`` in ISO 8601 with its UTC offset; None stays None."""
    moment = aware(moment)
    return None if moment is None else moment.isoformat()


def user() -> str:
    """The name of the user running this process (``unknown`` when it cannot be told)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
