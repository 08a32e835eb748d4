"""Fleet errors and their exit codes (beyond the registry's 0-7, see :mod:`registry.errors`).

=====  ==========================================================================
code   meaning
=====  ==========================================================================
8      quality gate: the plan was published with its metrics but is below
       ``--min-psnr`` / ``--min-speedup``, so it was not promoted
9      the calibration job failed (a worker error); rerunning resumes from the
       stored shards
10     the job is running under another driver's live lease (``--no-wait``)
=====  ==========================================================================
"""

from __future__ import annotations

from registry.errors import RegistryError

QUALITY_GATE = 8
JOB_FAILED = 9
JOB_BUSY = 10


class QualityGateFailed(RegistryError):
    """The plan is below the requested fidelity or speed-up (recorded, not promoted)."""

    exit_code = QUALITY_GATE


class JobFailed(RegistryError):
    """Computing the job failed; its shards so far stay stored for a rerun."""

    exit_code = JOB_FAILED


class JobBusy(RegistryError):
    """Another driver holds the job's lease."""

    exit_code = JOB_BUSY
