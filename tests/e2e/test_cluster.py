"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each its own raylet with
1 CPU, on 127.0.0.1 (`ray start --head`, then `ray start --address` per node). The runs folder is a
``file://`` URI, standing in for storage that every node sees. Workers are spread over the nodes, a node
is killed under a running job, and an elastic run shrinks and grows back."""
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sample_log
import torch
import yaml
from conftest import PLUGINS_FOR_TESTS, TINY_PLUGINS, free_port
from safetensors.torch import load_file

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

pytestmark = pytest.mark.slow
EPOCHS = 3  # 192 samples, 2 x 32 a step: 3 steps an epoch
VENV_BIN = Path(sys.executable).parent


class LocalCluster:
    """A Ray head (no CPUs: it runs the driver's side, the job server and the Train controller) and worker
    nodes of 1 CPU each, every one a `ray start --block` process group of its own: stopping the group stops
    that node and nothing else on the machine."""

    def __init__(self, temp_dir: Path, env: dict[str, str]) -> None:
        self.gcs, self.dashboard = free_port(), free_port()
        self.env, self.nodes = env, {}  # node ID -> its `ray start` process
        self.temp_dir, self.started = temp_dir, []
        # a lost node is noticed in about 2 s (Ray's default: 15 s)
        system = json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                             "health_check_timeout_ms": 500})
        self.head = self._start("--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", "--num-cpus=0",
                                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                                f"--temp-dir={temp_dir / 'head'}", f"--system-config={system}")
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
        import ray

        # its own temporary folder, as on its own machine: nodes that shared one would delete the files of a
        # runtime env (a job's working_dir) that is unused on their side but used on another's
        temp_dir = self.temp_dir / f"node-{len(self.started)}"
        self.started.append(temp_dir)
        process = self._start(f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              f"--temp-dir={temp_dir}")
        wait_for(lambda: _raylet(process) is not None, "the new node's raylet", 120)
        node_id = _raylet(process)[1]
        wait_for(lambda: any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), "the new node", 120)
        self.nodes[node_id] = process
        return node_id

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's raylet by its PID, as when a machine is lost, then what else that node ran."""
        process = self.nodes.pop(node_id)
        os.kill(_raylet(process)[0], signal.SIGKILL)
        process.wait(timeout=60)  # `ray start --block` notices and exits
        _stop(process, signal.SIGKILL)

    def shutdown(self) -> None:
        for process in self.nodes.values():
            _stop(process, signal.SIGKILL)
        _stop(self.head, signal.SIGTERM)


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


def _stop(process: subprocess.Popen, how: signal.Signals) -> None:
    try:
        os.killpg(process.pid, how)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, plait_cache):
    import ray

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PLAIT_CACHE": str(plait_cache),
           "PYTHONPATH": str(PLUGINS_FOR_TESTS), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"  # the Train controller checks its workers this often
    cluster = LocalCluster(tmp_path_factory.mktemp("ray"), env)
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS), "PLAIT_CACHE": str(plait_cache)}})
        for _ in range(2):
            cluster.add_node()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def configure(tmp_path, name: str, **scaling):
    log = tmp_path / f"{name}-samples.jsonl"
    plugins = {**TINY_PLUGINS, "sample_log": {"path": str(log), "seconds_per_step": 1.0}}
    config = {"run": {"name": name, "runs_dir": f"file://{tmp_path / 'bucket'}", "epochs": EPOCHS, "batch_size": 32,
                      "eval_batch_size": 64, "log_every": 1, "checkpoint_every": 2},
              "scaling": {"num_workers": 2, "placement_strategy": "SPREAD", "max_failures": 1, **scaling},
              "plugins": plugins}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, log


def train_in_thread(path):
    """Run ``ray_runner.train`` in a thread; return it and where its result goes."""
    import threading

    outcome: dict = {}

    def run():
        raw = load_config(path, [])
        config, _ = prepare(raw, str(path))
        try:
            outcome["results"] = ray_runner.train(config, raw)
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpoints_in(bucket: Path, name: str) -> list[str]:
    folder = bucket / name / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if (p / ".complete").is_file()) if folder.is_dir() else []


def train_rows(bucket: Path, name: str) -> list[int]:
    rows = map(json.loads, (bucket / name / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in rows if r["split"] == "train"]


def final_weights(bucket: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(bucket / name / "checkpoints" / f"step-{3 * EPOCHS:08d}" / "model.safetensors"))


def each_sample_once_per_epoch(log: Path) -> None:
    for epoch, ids in sample_log.trained(log, EPOCHS).items():
        assert sorted(ids) == list(range(192)), f"epoch {epoch}: samples seen twice or skipped"


@pytest.fixture(scope="module")
def whole_run(cluster, tmp_path_factory):
    """A run never interrupted: 2 workers on the 2 worker nodes."""
    tmp_path = tmp_path_factory.mktemp("whole")
    path, log = configure(tmp_path, "whole")
    raw = load_config(path, [])
    config, _ = prepare(raw, str(path))
    return tmp_path / "bucket", log, ray_runner.train(config, raw)


def test_two_workers_run_on_two_nodes_and_the_run_is_in_storage(cluster, whole_run):
    bucket, log, results = whole_run
    worker_nodes = set(cluster.nodes)
    placed = [worker["node_id"] for worker in results["workers"]]
    assert len(placed) == 2 and set(placed) == worker_nodes, "SPREAD: one worker on each worker node"
    assert results["steps"] == 3 * EPOCHS and results["test"]["fused"]["samples"] == 64
    assert train_rows(bucket, "whole") == list(range(1, 3 * EPOCHS + 1))
    assert (bucket / "whole" / "metrics.json").is_file()
    each_sample_once_per_epoch(log)


def test_a_lost_node_is_replaced_and_the_run_ends_as_if_never_interrupted(cluster, whole_run, tmp_path):
    path, log = configure(tmp_path, "lost")
    bucket = tmp_path / "bucket"
    thread, outcome = train_in_thread(path)
    wait_for(lambda: "step-00000004" in checkpoints_in(bucket, "lost"), "the step-4 checkpoint (mid-epoch 2)")
    victim = next(iter(cluster.nodes))
    cluster.kill_node(victim)
    cluster.add_node()  # the replacement
    thread.join(timeout=420)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert results["steps"] == 3 * EPOCHS and victim not in {w["node_id"] for w in results["workers"]}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({row["id"] for row in rows}) == 2, "one restart: two attempts"
    assert train_rows(bucket, "lost") == list(range(1, 3 * EPOCHS + 1)), "no metric row duplicated or missing"
    each_sample_once_per_epoch(log)
    whole, lost = final_weights(whole_run[0], "whole"), final_weights(bucket, "lost")
    assert whole.keys() == lost.keys() and all(torch.equal(whole[k], lost[k]) for k in whole), "bitwise"


def test_an_elastic_run_shrinks_to_one_worker_and_grows_back_keeping_its_place(cluster, tmp_path):
    epochs = EPOCHS + 2
    path, log = configure(tmp_path, "elastic", num_workers=[1, 2], elastic_resize_interval_s=2)
    config = yaml.safe_load(path.read_text())
    config["run"]["epochs"] = epochs
    # Ray Train's resource coordinator looks at the cluster every 20 s: one worker goes slowly enough to grow
    config["plugins"]["sample_log"]["seconds_per_step"] = {1: 4.0, 2: 1.0}
    path.write_text(yaml.safe_dump(config))
    bucket = tmp_path / "bucket"

    def world_sizes() -> list[int]:
        """The world size of each attempt, in order."""
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        attempts = {row["id"]: (row["started"], row["world_size"]) for row in rows}
        return [world for _, world in sorted(attempts.values())]

    thread, outcome = train_in_thread(path)
    wait_for(lambda: "step-00000004" in checkpoints_in(bucket, "elastic"), "the step-4 checkpoint")
    cluster.kill_node(next(iter(cluster.nodes)))
    wait_for(lambda: world_sizes()[-1:] == [1], "the run to go on with one worker")
    cluster.add_node()
    thread.join(timeout=420)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert world_sizes() == [2, 1, 2], "shrunk when the node was lost, grew back when one joined"
    results = outcome["results"]
    assert results["steps"] == 3 * epochs and results["world_size"] == 2
    assert train_rows(bucket, "elastic") == list(range(1, 3 * epochs + 1))
    by_step: dict[int, int] = {}
    for epoch, ids in sample_log.trained(log, epochs).items():
        assert sorted(ids) == list(range(192)), f"epoch {epoch}: samples seen twice or skipped"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    last = {row["step"]: row["id"] for row in sorted(rows, key=lambda r: r["started"])}
    for row in rows:
        if last[row["step"]] == row["id"]:
            by_step[row["step"]] = by_step.get(row["step"], 0) + len(row["ids"])
    assert set(by_step.values()) == {64}, "the global batch stays 64 on one worker (2 accumulated batches)"


def test_plait_launch_runs_a_job_over_two_nodes_and_the_run_is_in_storage(cluster, tmp_path):
    """`plait launch` to the head's job server: the job's driver runs on the head, its two workers on the
    two worker nodes, and the run folder is in storage."""
    bucket = tmp_path / "bucket"
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "launched", "epochs": 1, "batch_size": 32, "runs_dir": f"file://{bucket}"},
        "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"},
        "plugins": {k: v for k, v in TINY_PLUGINS.items() if k != "image_encoder"}}, sort_keys=False))
    launched = subprocess.run(
        [sys.executable, "-m", "plait.launch.cli", "launch", str(path), "--address",
         f"http://127.0.0.1:{cluster.dashboard}", "--follow", "--no-wheel"],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in cluster.env.items() if k != "PYTHONPATH"})
    assert launched.returncode == 0, launched.stderr[-3000:] + launched.stdout[-3000:]
    assert "SUCCEEDED" in launched.stderr
    placed = re.findall(r"rank \d on node ([0-9a-f]{12})", launched.stdout)
    assert sorted(placed) == sorted(node[:12] for node in cluster.nodes), launched.stdout[-2000:]
    metrics = json.loads((bucket / "launched" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test"]["fused"]["samples"] == 64
    assert checkpoints_in(bucket, "launched") == ["step-00000003"]
