"""The Ray head dies under a running `plait train`: the driver ends with one line that names the head and
the checkpoint kept in storage, and the same command resumes the run on a new cluster."""
import json
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_PLUGINS
from ray_cluster import LocalCluster, checkpoints_in, node_env, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_a_head_that_dies_mid_job_is_named_and_the_run_resumes(tmp_path, plait_cache):
    bucket = tmp_path / "bucket"
    path = tmp_path / "headless.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "headless", "runs_dir": f"file://{bucket}", "epochs": 2, "batch_size": 32, "log_every": 1,
                "checkpoint_every": 2},
        "scaling": {"num_workers": 1},
        "plugins": {**TINY_PLUGINS, "sample_log": {"path": str(tmp_path / "samples.jsonl"),
                                                   "seconds_per_step": 1.0}}}, sort_keys=False))
    env = node_env(plait_cache)

    def train(cluster):
        return subprocess.Popen([sys.executable, "-m", "plait.launch.cli", "train", str(path), "--address",
                                 cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    cluster = LocalCluster(env)
    try:
        cluster.add_node()
        driver = train(cluster)
        wait_for(lambda: "step-00000002" in checkpoints_in(bucket, "headless") or driver.poll() is not None,
                 "the step-2 checkpoint")
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        cluster.kill_head()
        _, stderr = driver.communicate(timeout=120)
    finally:
        cluster.shutdown()
    assert driver.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"plait: error: the Ray head at {cluster.address} stopped answering during the run"), last
    assert "the newest checkpoint in file://" in last and "the same command resumes the run" in last, last
    assert "Traceback" not in stderr

    cluster = LocalCluster(env)  # the cluster back
    try:
        cluster.add_node()
        driver = train(cluster)
        _, stderr = driver.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert driver.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (bucket / "headless" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13)), "no row lost or repeated"
