"""Registry errors and the CLI exit code each one maps to.

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      success
1      any other error (unexpected failure, a command that needs a database
       without one configured, ...)
2      usage or invalid input (bad option, malformed resolution, plan file that
       does not parse or does not agree with ``--model/--resolution/--steps``)
3      not found: no matching plan, unknown model, plan or alias (the message
       lists what exists)
4      integrity check failed: stored bytes do not hash to their recorded sha256
5      database or object store unreachable (or refusing access)
6      database schema missing or not at this tool's revision
7      conflict: a stale alias move (optimistic lock) or an existing model alias
=====  ==========================================================================
"""

from __future__ import annotations

OK = 0
GENERIC = 1
USAGE = 2
NOT_FOUND = 3
INTEGRITY = 4
UNREACHABLE = 5
SCHEMA = 6
CONFLICT = 7


class RegistryError(Exception):
    """Base class: a one-line message for the user and an exit code."""

    exit_code = GENERIC


class InvalidInput(RegistryError):
    """The request is malformed or contradicts the plan file."""

    exit_code = USAGE


class NotFound(RegistryError):
    """Nothing matches: no such model, plan, alias, or no plan for the query."""

    exit_code = NOT_FOUND


class IntegrityFailure(RegistryError):
    """Bytes read from a store or cache do not hash to the recorded sha256 and size."""

    exit_code = INTEGRITY


class Unreachable(RegistryError):
    """The database or the object store cannot be reached or refuses access."""

    exit_code = UNREACHABLE


class SchemaMismatch(RegistryError):
    """The database schema is missing or not at the revision this tool needs."""

    exit_code = SCHEMA


class Conflict(RegistryError):
    """A concurrent change won: stale alias version, existing model alias."""

    exit_code = CONFLICT
