"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each its own raylet with
1 CPU, on 127.0.0.1 (`ray start --head`, then `ray start --address` per node). The runs folder is a
``file://`` URI, standing in for storage that every node sees. Workers are spread over the nodes, a node
is killed under a running job, and an elastic run shrinks and grows back."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sample_log
import torch
import yaml
from conftest import PLUGINS_FOR_TESTS, TINY_PLUGINS
from ray_cluster import LocalCluster, checkpoints_in, node_env, wait_for
from safetensors.torch import load_file

from plait.core.config import load_config
from plait.core.errors import ConfigError
from plait.core.runs import prepare
from plait.launch import ray_runner

pytestmark = pytest.mark.slow
EPOCHS = 3  # 192 samples, 2 x 32 a step: 3 steps an epoch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, plait_cache):
    import ray

    env = node_env(plait_cache)
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE",)}
    os.environ.update({key: env[key] for key in saved})  # this process is the driver: as the nodes have it
    cluster = LocalCluster(env)
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS), "PLAIT_CACHE": str(plait_cache)}})
        for _ in range(2):
            cluster.add_node()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def configure(tmp_path, name: str, seconds_per_step: float = 1.0, **scaling):
    """A run of 2 workers spread over the nodes; each step takes ``seconds_per_step`` at least, so that a node
    can be lost under a running job."""
    log = tmp_path / f"{name}-samples.jsonl"
    plugins = {**TINY_PLUGINS, "sample_log": {"path": str(log), "seconds_per_step": seconds_per_step}}
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
    """A run never interrupted: 2 workers on the 2 worker nodes, at full speed."""
    tmp_path = tmp_path_factory.mktemp("whole")
    path, log = configure(tmp_path, "whole", seconds_per_step=0.0)
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


@pytest.mark.timeout(600)
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


@pytest.mark.timeout(600)
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
    for row in sample_log.counted_rows(log):
        by_step[row["step"]] = by_step.get(row["step"], 0) + len(row["ids"])
    assert set(by_step.values()) == {64}, "the global batch stays 64 on one worker (2 accumulated batches)"


@pytest.mark.timeout(600)
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


def test_storage_that_a_node_cannot_write_is_one_line_naming_the_node(cluster, tmp_path):
    path, _ = configure(tmp_path, "unwritable")
    raw = load_config(path, ["run.runs_dir=file:///proc/plait-runs"])
    config, _ = prepare(raw, str(path))
    with pytest.raises(ConfigError) as err:
        ray_runner.check_storage_on_nodes(config)
    message = str(err.value)
    assert re.match(r".*: run.runs_dir: node [\d.]+ \([0-9a-f]{12}\) cannot write to file:///proc/plait-runs: .*"
                    r"; every node must reach the runs folder$", message) and "\n" not in message, message
    raw = load_config(path, [])
    ray_runner.check_storage_on_nodes(prepare(raw, str(path))[0])  # the test's bucket: every node writes there
