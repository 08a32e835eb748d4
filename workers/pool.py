"""A pool of calibration actors on Ray: start them, map shards over them, survive deaths.

Work is handed out one shard at a time to ready actors. When an actor dies mid-shard (its
process killed, its node lost) the shard goes back to the queue and the actor is probed again:
Ray restarts it (``max_restarts``) and it rejoins once its pipeline is loaded; an actor that
cannot come back (restarts exhausted, no node with room) simply never rejoins, and the others
finish the queue.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from registry.errors import RegistryError, Unreachable

from .actors import remote_worker
from .errors import JobFailed

MAX_SHARD_FAILURES = 5
MAX_PROBES = 30  # readiness probes of a dead actor while Ray may be restarting it
PROBE_DELAY_S = 1.0
NO_WORKER_TIMEOUT_S = 600.0


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def default_worker_count(cpus_per_worker: float) -> int:
    """One worker per GPU, else as many as the cluster's CPUs hold."""
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return int(resources["GPU"])
    return max(1, int(resources.get("CPU", 1) // cpus_per_worker))


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
def ray_session(address: str | None, num_cpus: int | None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray for this command.

    An already initialized Ray (tests, notebooks) is used as is and left running.
    """
    try:
        import ray
    except ImportError:
        raise RegistryError("calibrate needs Ray: pip install 'invardiff[fleet]'") from None

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(
                address="local",  # never join a cluster a stale ray_current_cluster names
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                **options,
            )
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds: all mean "no cluster"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unreachable(f"cannot start or reach Ray at {address or 'local'}: {detail}") from None
    try:
        yield
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
        count: int,
        cpus_per_worker: float = 1.0,
        say: Callable[[str], None] = lambda message: None,
    ) -> None:
        import ray

        actor_class = remote_worker(cluster_has_gpus(), cpus_per_worker)
        self.actors = [
            actor_class.remote(request, job_key, store_url, s3_endpoint_url) for _ in range(count)
        ]
        self.probes = {actor.ready.remote(): actor for actor in self.actors}
        self.idle: list[Any] = []
        self.info: dict[int, dict[str, Any]] = {}
        self.say = say
        self.restarts = 0
        self.probe_failures: dict[int, int] = {}
        self.reprobe_at: dict[int, float] = {}
        self._ray = ray

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
            if waited > NO_WORKER_TIMEOUT_S:
                raise JobFailed(f"no worker became ready in {NO_WORKER_TIMEOUT_S:.0f} s")
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

    def workers(self) -> list[dict[str, Any]]:
        return [self.info[i] for i in sorted(self.info)]

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
