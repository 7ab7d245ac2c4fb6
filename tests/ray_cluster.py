"""A real Ray cluster of several nodes on this machine, for tests: a head and worker nodes on 127.0.0.1,
each its own `ray start --block` process group (and temporary folder, as separate machines have)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

VENV_BIN = Path(sys.executable).parent


def node_env(plait_cache: Path) -> dict[str, str]:
    """The environment of the nodes' processes (and of drivers that connect to them): this venv, the test
    plugins, the shared data cache, the tests' own (conftest's: a Train controller that checks its workers
    every 0.5 s), and no token authentication (the nodes listen on 127.0.0.1 only)."""
    from conftest import PLUGINS_FOR_TESTS

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PLAIT_CACHE": str(plait_cache),
           "PYTHONPATH": str(PLUGINS_FOR_TESTS),
           # said, not left to Ray: a head started where ~/.ray/auth_token exists would otherwise want a token
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


class LocalCluster:
    """A Ray head (no CPUs: it runs the driver's side, the job server and the Train controller) and worker
    nodes of 1 CPU each, every one a `ray start --block` process group of its own: stopping the group stops
    that node and nothing else on the machine."""

    def __init__(self, env: dict[str, str]) -> None:
        self.gcs, self.dashboard = free_port(), free_port()
        self.env, self.nodes = env, {}  # node ID -> its `ray start` process
        # short: Ray's socket paths inside it must fit a Unix socket's 107 bytes
        self.temp_dir, self.started = Path(tempfile.mkdtemp(prefix="plait-ray-")), []
        # a lost node is noticed in about 2 s (Ray's default: 15 s)
        system = json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                             "health_check_timeout_ms": 500})
        self.head = self._start("--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", "--num-cpus=0",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                                f"--temp-dir={self.temp_dir / 'head'}", f"--system-config={system}")
        wait_for(lambda: _listening(self.dashboard), "the Ray head", 120)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    def _start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def add_node(self) -> str:
        """Start a worker node; return its node ID once it is alive in the cluster."""
        # its own temporary folder, as on its own machine: nodes that shared one would delete the files of a
        # runtime env (a job's working_dir) that is unused on their side but used on another's
        temp_dir = self.temp_dir / f"node-{len(self.started)}"
        self.started.append(temp_dir)
        process = self._start(f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              f"--temp-dir={temp_dir}")
        wait_for(lambda: _raylet(process) is not None, "the new node's raylet", 120)
        node_id = _raylet(process)[1]
        wait_for(lambda: node_id in self.alive_nodes(), "the new node", 120)
        self.nodes[node_id] = process
        return node_id

    def alive_nodes(self) -> set[str]:
        """The IDs of the nodes the head counts alive (from its dashboard's state API: no Ray client needed)."""
        url = f"http://127.0.0.1:{self.dashboard}/api/v0/nodes?limit=100"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except OSError:
            return set()
        return {node["node_id"] for node in nodes if node["state"] == "ALIVE"}

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's raylet by its PID, as when a machine is lost, then what else that node ran."""
        process = self.nodes.pop(node_id)
        os.kill(_raylet(process)[0], signal.SIGKILL)
        process.wait(timeout=60)  # `ray start --block` notices and exits
        stop_node(process)

    def kill_head(self) -> None:
        """SIGKILL every process of the head node: its GCS, raylet and job server."""
        stop_node(self.head)

    def shutdown(self) -> None:
        """Every node stopped, the head too, and the temporary folder with them."""
        for process in self.nodes.values():
            stop_node(process)
        stop_node(self.head)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _raylet(process: subprocess.Popen) -> tuple[int, str] | None:
    """(PID, node ID) of the raylet that a `ray start` process started."""
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for pid in children:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if args and args[0].endswith("/raylet"):
                return int(pid), next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
    except OSError:
        pass
    return None


def stop_node(process: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` process group: every process of that node stops at once (given SIGTERM,
    a head takes ~33 s here to exit)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def checkpoints_in(bucket: Path, name: str) -> list[str]:
    """The complete checkpoints of run ``name`` in the ``file://`` storage folder ``bucket``."""
    folder = bucket / name / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if (p / ".complete").is_file()) if folder.is_dir() else []
