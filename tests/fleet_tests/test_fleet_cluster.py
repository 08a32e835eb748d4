"""A real two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``,
separate processes): the job runs through ``--ray-address`` and survives losing a node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from fleet_helpers import RAY_ENV, ROOT, cli_process, finish, open_registry, wait_for_line

from registry.store import blob_key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_node(*args: str) -> subprocess.Popen:
    ray = shutil.which("ray")
    if ray is None:
        pytest.fail("the ray command is not installed (pip install 'invardiff[fleet]')")
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [ray, "start", "--block", "--num-cpus=1", "--num-gpus=0",
               "--object-store-memory=100000000", *args]  # fmt: skip
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(node: subprocess.Popen, grace: float = 10) -> None:
    """Stop one node by its process group (the ``ray start`` process and the daemons it ran)."""
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


def _wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on {port} in {timeout} s")


def _wait_nodes(port: int, count: int, timeout: float = 120) -> None:
    """Until the cluster has ``count`` live nodes (asked by a short-lived driver)."""
    probe = (
        f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    env = {**os.environ, **RAY_ENV}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
        )
        if out.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {count} nodes in {timeout} s")


def test_two_node_cluster_completes_after_losing_a_node(home):
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-")  # short (socket paths) and not the shared /tmp/ray
    head = _start_node(
        "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"
    )
    second = None
    try:
        _wait_port(port)
        second = _start_node(f"--address=127.0.0.1:{port}")
        _wait_nodes(port, 2)  # so that both workers load at the same time
        args = ["calibrate", "digits-flux", "16", "--trajectories", "8", "--workers", "2",
                "--validate", "0", "--ray-address", f"127.0.0.1:{port}", "--json"]  # fmt: skip
        driver = cli_process(home, *args)
        lines = wait_for_line(driver, "ready (2/2)")  # it is handed a shard at once
        _stop(second, grace=0)  # the second node dies mid-job
        assert not any("building the plan" in line for line in lines)
        nodes = {line.split(" node ")[1].split()[0] for line in lines if " ready (" in line}
        assert len(nodes) == 2, lines  # one worker on each node (one CPU each)
        code, result, err = finish(driver)
        assert code == 0, err
        assert result["created"] and result["phases"]["phase-2"]["computed"] == 8
        assert open_registry(home).store.get(blob_key(result["sha256"]))
    finally:
        if second is not None:
            _stop(second, grace=0)
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
