"""Calibration job rows on real SQLite and PostgreSQL: claims, leases, takeover, listing."""

from __future__ import annotations

import threading
import time

import pytest

from registry import jobs
from registry.errors import Conflict, InvalidInput, NotFound

KEY = "ab" * 32
REQUEST = {"source": "builtin://digits-flux", "calls": [{"seed": 1000}]}


def test_claim_is_exclusive_until_the_lease_expires(registry):
    first = jobs.claim(registry, KEY, "digits-flux", REQUEST, "host:1:a", lease_seconds=0.5)
    assert first.state == jobs.ACQUIRED and first.inserted and first.job.attempts == 1
    busy = jobs.claim(registry, KEY, "digits-flux", REQUEST, "host:2:b", lease_seconds=0.5)
    assert busy.state == jobs.BUSY and busy.job.lease_holder == "host:1:a"
    jobs.heartbeat(registry, KEY, "host:1:a", {"phase-1": {"done": 1}}, lease_seconds=0.5)
    assert jobs.get_job(registry, KEY[:8]).progress == {"phase-1": {"done": 1}}
    time.sleep(0.7)  # the first driver died: its lease runs out
    taken = jobs.claim(registry, KEY, "digits-flux", REQUEST, "host:2:b", lease_seconds=30)
    assert taken.state == jobs.ACQUIRED and not taken.inserted and taken.job.attempts == 2
    assert taken.job.progress == {"phase-1": {"done": 1}}  # the progress so far is kept
    with pytest.raises(Conflict):  # the old holder notices and stops
        jobs.heartbeat(registry, KEY, "host:1:a")
    with pytest.raises(Conflict):
        jobs.finish(registry, KEY, "host:1:a", {}, {}, {})
    jobs.fail(registry, KEY, "host:1:a", "late failure", {})  # ignored: not the holder
    assert jobs.get_job(registry, KEY).status == "running"
    done = jobs.finish(registry, KEY, "host:2:b", {"version": 1}, {"total_s": 1.0}, {})
    assert (
        done.status == "succeeded" and done.lease_holder is None and done.result == {"version": 1}
    )
    again = jobs.claim(registry, KEY, "digits-flux", REQUEST, "host:3:c")
    assert again.state == jobs.SUCCEEDED and again.job.attempts == 2


def test_a_failed_job_is_resumed_by_the_next_claim(registry):
    jobs.claim(registry, KEY, "digits-flux", REQUEST, "a")
    jobs.fail(registry, KEY, "a", "RuntimeError: worker crashed", {"phase-1": {"seconds": 1}})
    failed = jobs.get_job(registry, KEY)
    assert failed.status == "failed" and "worker crashed" in failed.error
    resumed = jobs.claim(registry, KEY, "digits-flux", REQUEST, "b")
    assert (
        resumed.state == jobs.ACQUIRED and resumed.job.attempts == 2 and resumed.job.error is None
    )


def test_racing_claims_give_the_job_to_exactly_one_driver(registry):
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def race(n: int) -> None:
        barrier.wait()
        outcomes.append(jobs.claim(registry, KEY, "digits-flux", REQUEST, f"driver-{n}").state)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [jobs.ACQUIRED] + [jobs.BUSY] * 5
    assert len(jobs.list_jobs(registry)) == 1


def test_ensure_job_inserts_once_and_listing_filters(registry):
    job, created = jobs.ensure_job(registry, KEY, "digits-flux", REQUEST)
    assert created and job.status == "pending" and job.attempts == 0
    assert jobs.ensure_job(registry, KEY, "digits-flux", REQUEST) == (job, False)
    jobs.ensure_job(registry, "cd" * 32, "digits-dit", REQUEST)
    assert [j.model for j in jobs.list_jobs(registry)] == ["digits-dit", "digits-flux"]
    assert [j.job_key for j in jobs.list_jobs(registry, model="digits-flux")] == [KEY]
    assert jobs.list_jobs(registry, status="running") == []
    with pytest.raises(InvalidInput):
        jobs.list_jobs(registry, status="bogus")
    with pytest.raises(NotFound):
        jobs.get_job(registry, "ef" * 4)
    with pytest.raises(InvalidInput):
        jobs.get_job(registry, "ab")  # too short
