"""A pool of calibration actors on Ray: start them, map shards over them, survive deaths.

Work is handed out one shard at a time to ready actors. When an actor dies mid-shard (its
process killed, its node lost) the shard goes back to the queue and the actor is probed again:
Ray restarts it (``max_restarts``) and it rejoins once its pipeline is loaded; an actor that
cannot come back (restarts exhausted, no node with room) simply never rejoins, and the others
finish the queue.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from registry.errors import InvalidInput, RegistryError, Unreachable

from .actors import remote_worker
from .errors import JobFailed

MAX_SHARD_FAILURES = 5
MAX_PROBES = 30  # readiness probes of a dead actor while Ray may be restarting it
PROBE_DELAY_S = 1.0
NO_WORKER_TIMEOUT_S = 600.0  # default of INVARDIFF_WORKER_START_TIMEOUT_S
GPUS_ENV = "INVARDIFF_WORKER_GPUS"  # GPUs per worker a cluster's jobs ask for (0: CPU workers)
MAX_WORKERS_ENV = "INVARDIFF_MAX_WORKERS"  # the most workers an autoscaling cluster can offer
START_TIMEOUT_ENV = "INVARDIFF_WORKER_START_TIMEOUT_S"


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers a job starts, with what each asks for, and why that many."""

    requested: int | None  # --workers (None: the default)
    count: int
    cap: int  # the most the cluster holds (local: CPUs or GPUs present; cluster: ever offers)
    gpus: float  # per worker (0: CPU workers)
    cpus: float  # per worker
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise InvalidInput(f"{name}={text!r}: expected a finite number >= 0")
    return value


def start_timeout() -> float:
    """Seconds to wait for a first worker (``INVARDIFF_WORKER_START_TIMEOUT_S``, default 600):
    time for an autoscaler to bring a GPU node up from zero."""
    value = _env_number(START_TIMEOUT_ENV, NO_WORKER_TIMEOUT_S)
    if value <= 0:
        raise InvalidInput(f"{START_TIMEOUT_ENV} must be > 0")
    return value


def worker_resources(gpus: float, cpus: float) -> dict[str, float]:
    """What one actor asks Ray for: ``gpus`` GPUs (and no CPU) each, else ``cpus`` CPUs."""
    return {"num_gpus": gpus, "num_cpus": 0} if gpus > 0 else {"num_cpus": cpus}


def plan_workers(
    requested: int | None,
    trajectories: int,
    cpus_per_worker: float,
    gpus_per_worker: float | None = None,
    local: bool = False,
) -> WorkerPlan:
    """The job's worker count and per-worker resources on the connected Ray.

    GPUs per worker: ``gpus_per_worker``, else ``INVARDIFF_WORKER_GPUS``, else 1 when the
    cluster has GPUs now. Asked for GPUs, actors request them whether or not any exist yet, so
    that an autoscaler scales up by demand. The count is ``requested`` (default: as many as the
    cluster holds), capped at what it holds: on a local Ray the CPUs or GPUs present; on a
    cluster the larger of what it has now and ``INVARDIFF_MAX_WORKERS`` (what its autoscaler can
    ever add); and at one per trajectory.
    """
    import ray

    resources = ray.cluster_resources()
    present_gpus = resources.get("GPU", 0.0)
    gpus = gpus_per_worker
    if gpus is None:
        gpus = _env_number(GPUS_ENV, 1.0 if present_gpus > 0 else 0.0)
    unit, kind = (gpus, "GPUs") if gpus > 0 else (cpus_per_worker, "CPUs")
    present = int((present_gpus if gpus > 0 else resources.get("CPU", 0.0)) // unit)
    declared = 0 if local else int(_env_number(MAX_WORKERS_ENV, 0))
    cap = max(present, declared)
    where = "this local Ray" if local else "the cluster"
    if cap == 0:  # nothing now and nothing declared: trust the autoscaler with one per call
        cap = trajectories
        why = f"no {kind} on {where} yet; {MAX_WORKERS_ENV} unset: one per trajectory at most"
    elif declared > present:
        why = f"{MAX_WORKERS_ENV}={declared}: what {where} can scale up to"
    else:
        why = f"the {kind} of {where} hold {present} worker(s)"
    count = min(requested or cap, cap, trajectories)
    if requested is not None and count < requested:
        why = f"asked {requested}, capped at {count}: " + (
            why if requested > cap else f"one per trajectory ({trajectories})"
        )
    return WorkerPlan(requested, count, cap, float(gpus), float(cpus_per_worker), why)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when ``host:port`` does not accept connections."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if parsed.hostname is None or parsed.port is None:
        return  # "auto", "local": let Ray resolve it
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as exc:
        raise Unreachable(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}"
        ) from None


@contextmanager
def stdout_to_stderr():
    """While Ray runs in this process, whatever it prints goes to stderr, never stdout.

    Ray's driver prints other processes' messages (``(raylet) ...`` when a worker or node is
    lost) on ``sys.stdout``, and its C++ core and the processes it starts inherit file
    descriptor 1; both are pointed at stderr, so that ``--json`` output stays parseable.
    """
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptor 1 or 2 (a daemon): nothing to protect there
        saved = None
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextmanager
def ray_session(address: str | None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray for this command.

    Yields whether this is a local Ray started here (its CPUs and GPUs are this machine's).
    An already initialized Ray (tests, notebooks) is used as is and left running. Ray's own
    output goes to stderr (:func:`stdout_to_stderr`).
    """
    try:
        import ray
    except ImportError:
        raise RegistryError("calibrate needs Ray: pip install 'invardiff[fleet]'") from None

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    with stdout_to_stderr():
        if ray.is_initialized():
            yield False
            return
        options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **options)
            else:  # the machine's CPUs (never more: --workers is capped at them) and GPUs
                ray.init(
                    address="local",  # never join a cluster a stale ray_current_cluster names
                    num_cpus=os.cpu_count() or 1,
                    include_dashboard=False,
                    **options,
                )
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds: all mean "no cluster"
            text = str(exc).strip()
            detail = text.splitlines()[0] if text else type(exc).__name__
            raise Unreachable(
                f"cannot start or reach Ray at {address or 'local'}: {detail}"
            ) from None
        try:
            yield not address
        finally:
            ray.shutdown()


class WorkerPool:
    """``count`` calibration actors for one request."""

    def __init__(
        self,
        request: dict[str, Any],
        job_key: str,
        store_url: str,
        s3_endpoint_url: str | None,
        plan: WorkerPlan,
        say: Callable[[str], None] = lambda message: None,
        on_event: Callable[[str, str], None] = lambda event, detail: None,
    ) -> None:
        import ray

        actor_class = remote_worker(worker_resources(plan.gpus, plan.cpus))
        self.actors = [
            actor_class.remote(request, job_key, store_url, s3_endpoint_url)
            for _ in range(plan.count)
        ]
        self.probes = {actor.ready.remote(): actor for actor in self.actors}
        self.idle: list[Any] = []
        self.info: dict[int, dict[str, Any]] = {}
        self.lost: list[dict[str, Any]] = []  # workers that died, with whether their node did
        self.say, self.on_event = say, on_event
        self.restarts = 0
        self.start_timeout = start_timeout()
        self.probe_failures: dict[int, int] = {}
        self.reprobe_at: dict[int, float] = {}
        self._ray = ray

    def _dead_nodes(self) -> set[str]:
        return {n["NodeID"] for n in self._ray.nodes() if not n["Alive"]}

    def _lose(self, actor) -> None:
        """A worker died mid-task: no longer listed as used; recorded with its node's fate."""
        index = self.actors.index(actor)
        info = self.info.pop(index, None)
        if info is None:
            return
        node_lost = info["node"] in self._dead_nodes()
        self.lost.append({**info, "node_lost": node_lost})
        what = f"node {info['node'][:8]} lost" if node_lost else "worker lost"
        detail = f"worker {index + 1} (pid {info['pid']} on {info['host']})"
        self.say(f"{what}: {detail}; its task goes back to the queue")
        self.on_event("node_lost" if node_lost else "worker_lost", detail)

    def _probe(self, actor) -> None:
        self.probes[actor.ready.remote()] = actor

    def _joined(self, ref, actor) -> None:
        """A probe answered: the actor joins the idle workers, or is probed again later."""
        from ray.exceptions import RayActorError

        try:
            info = self._ray.get(ref)
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise JobFailed(f"a worker failed to start: {_one_line(exc)}") from None
            index = self.actors.index(actor)
            self.probe_failures[index] = self.probe_failures.get(index, 0) + 1
            if self.probe_failures[index] <= MAX_PROBES:  # maybe restarting: ask again soon
                self.reprobe_at[index] = time.monotonic() + PROBE_DELAY_S
            return
        except Exception as exc:  # noqa: BLE001 - e.g. the pipeline failed to load
            raise JobFailed(f"a worker failed to start: {_one_line(exc)}") from None
        index = self.actors.index(actor)
        self.info[index] = info
        self.idle.append(actor)
        self.say(
            f"worker {index + 1} ready ({len(self.info)}/{len(self.actors)}) on {info['host']} "
            f"node {info['node'][:8]} "
            f"(pid {info['pid']}, {info['device']}, loaded in {info['load_s']} s)"
        )

    def _reprobe_due(self) -> None:
        now = time.monotonic()
        for index, due in list(self.reprobe_at.items()):
            if due <= now:
                del self.reprobe_at[index]
                self._probe(self.actors[index])

    def map(self, items: Iterable[int], submit: Callable[[Any, int], Any],
            on_done: Callable[[dict[str, Any]], None], tick: Callable[[], None],
            tick_s: float = 2.0) -> None:  # fmt: skip
        """Run ``submit(actor, item)`` for every item; ``on_done(result)`` as each finishes.

        ``tick`` runs at least every ``tick_s`` seconds (lease heartbeat; it may raise).
        """
        from ray.exceptions import RayActorError

        queue, inflight, failures = deque(items), {}, {}
        waited = 0.0
        while queue or inflight:
            while self.idle and queue:
                actor, item = self.idle.pop(0), queue.popleft()
                inflight[submit(actor, item)] = (actor, item)
            self._reprobe_due()
            refs = [*inflight, *self.probes]
            if not refs and not self.reprobe_at:
                raise JobFailed("every worker died and none could be restarted")
            done, _ = (
                self._ray.wait(refs, num_returns=1, timeout=tick_s)
                if refs
                else ([], time.sleep(0.2))
            )
            tick()
            waited = 0.0 if done or inflight else waited + tick_s
            if waited > self.start_timeout:
                raise JobFailed(
                    f"no worker became ready in {self.start_timeout:.0f} s "
                    f"({START_TIMEOUT_ENV}; on a cluster: did it get the GPUs or CPUs asked?)"
                )
            for ref in done:
                if ref in self.probes:
                    self._joined(ref, self.probes.pop(ref))
                    continue
                actor, item = inflight.pop(ref)
                try:
                    result = self._ray.get(ref)
                except RayActorError:  # killed or its node lost: retry the shard elsewhere
                    failures[item] = failures.get(item, 0) + 1
                    if failures[item] > MAX_SHARD_FAILURES:
                        raise JobFailed(
                            f"shard {item} lost its worker {failures[item]} times"
                        ) from None
                    self.restarts += 1
                    self._lose(actor)
                    queue.appendleft(item)
                    self._probe(actor)
                    continue
                except Exception as exc:  # noqa: BLE001 - a task error: the job fails
                    raise JobFailed(f"shard {item} failed: {_one_line(exc)}") from None
                self.idle.append(actor)
                on_done(result)

    def call_one(self, method: str, *args: Any, tick: Callable[[], None]) -> Any:
        """Run ``method`` on one ready worker (retried on another if that worker dies)."""
        results: list[Any] = []

        def submit(actor, _item):
            return getattr(actor, method).remote(*args)

        self.map([0], submit, results.append, tick)
        return results[0]

    def settle_lost(self) -> list[dict[str, Any]]:
        """The lost workers, each node's fate looked up again: Ray's GCS marks a node dead
        some seconds after it goes (its health checks), often after its workers' tasks failed."""
        dead = self._dead_nodes() if any(not w["node_lost"] for w in self.lost) else set()
        for worker in self.lost:
            if not worker["node_lost"] and worker["node"] in dead:
                worker["node_lost"] = True
                self.on_event("node_lost", f"node {worker['node'][:8]} of pid {worker['pid']}")
        return self.lost

    def workers(self) -> list[dict[str, Any]]:
        return [self.info[i] for i in sorted(self.info)]

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
