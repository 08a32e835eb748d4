"""Fault injection helpers: a freezable loopback TCP proxy, a silent server, forked commands."""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry_helpers import FLUX_PLANS, FLUX_SOURCE


class FreezableProxy:
    """A loopback TCP proxy to ``127.0.0.1:port`` that can stop forwarding (a hung server).

    While frozen, connections stay open and are accepted, but no byte moves either way:
    to a client it is a server process that stopped answering (as under SIGSTOP).
    """

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.running = threading.Event()
        self.running.set()
        self.thawed = threading.Event()
        self.thawed.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.thawed.clear()

    def thaw(self) -> None:
        self.thawed.set()

    def close(self) -> None:
        self.running.clear()
        self.thawed.set()
        for sock in [self.listener, *self.sockets]:
            sock.close()

    def _accept(self) -> None:
        while self.running.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.thawed.wait()
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        self.sockets += [client, server]
        pairs = {client: server, server: client}
        while self.running.is_set():
            if not self.thawed.wait(0.1):
                continue
            try:
                readable, _, _ = select.select(list(pairs), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    pairs[sock].sendall(data)
            except (OSError, ValueError):
                break
        client.close()
        server.close()


@contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        yield sock.getsockname()[1]


def plan_variants(tmp_path: Path, count: int) -> list[tuple[Path, bytes]]:
    """``count`` distinct native flux-dev plans (files) and the bytes publish stores for each."""
    from invardiff import load_plan

    base = json.loads(
        load_plan(
            FLUX_PLANS[0], model_id=FLUX_SOURCE.removeprefix("hf://"), revision="0123abc"
        ).to_bytes()
    )
    variants = []
    for number in range(count):
        base["calibration"]["variant"] = number
        path = tmp_path / f"variant-{number}.json"
        path.write_text(json.dumps(base))
        variants.append((path, load_plan(path).to_bytes()))
    return variants


def forked(
    function: Callable[..., Any], *args: Any, env: dict[str, str] | None = None
) -> tuple[multiprocessing.Process, Any]:
    """Run ``function(*args)`` in a forked process with ``env`` added; (process, result queue).

    The queue receives ``("ok", value)`` or ``("error", exit_code, message)``.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def run() -> None:
        from registry.errors import RegistryError

        os.environ.update(env or {})
        try:
            queue.put(("ok", function(*args)))
        except RegistryError as exc:
            queue.put(("error", exc.exit_code, str(exc)))

    process = context.Process(target=run, daemon=True)
    process.start()
    return process, queue


def wait_stopped(pid: int, timeout: float = 60) -> None:
    """Until process ``pid`` is stopped (it sent itself SIGSTOP at a crash point)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} never reached its crash point")
        time.sleep(0.02)
