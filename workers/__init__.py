"""Calibration fleet on Ray (see docs/fleet.md).

The API: :class:`workers.request.CalibrationRequest` (``build_request``, ``job_key``) and
:func:`workers.driver.submit`. Nothing here is imported by the engine or the registry's fetch
path; Ray and torch are imported only when a job runs.
"""
