"""`plait launch` against a real Ray head on 127.0.0.1 with its job server. Nothing mocked."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import stop_node

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
PLAIT = [sys.executable, "-m", "plait.launch.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TOKEN = "plait-test-token-3f9c2a7b1e"  # the head's: plait launch must send it and never show it


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN)
    return path


def client_env(token_file: Path | None = None, token: str | None = None) -> dict[str, str]:
    """The environment of a `plait launch` that finds the cluster's token (in a file, or $RAY_AUTH_TOKEN)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, plait_cache, token_file):
    """A Ray head with token authentication (RAY_AUTH_MODE=token) and its job server."""
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PLAIT_CACHE": str(plait_cache),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    start = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
             "--disable-usage-stats", f"--temp-dir={tmp_path_factory.mktemp('ray')}"]
    # --block keeps the head's processes in one process group of ours: teardown stops this
    # head only, never another Ray the machine may be running (as `ray stop` would).
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                stop_node(head)
                pytest.fail("the Ray head did not start")
            time.sleep(1)
    yield f"http://127.0.0.1:{dashboard}"
    stop_node(head)


def launch_config(tmp_path: Path) -> Path:
    from conftest import TINY_PLUGINS

    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "launched", "epochs": 1, "batch_size": 32, "runs_dir": str(tmp_path / "runs")},
        "scaling": {"num_workers": 1},
        "plugins": {k: v for k, v in TINY_PLUGINS.items() if k != "image_encoder"},
    }, sort_keys=False))
    return path


def test_launch_follows_a_job_to_success_and_resubmitting_resumes(ray_head, token_file, tmp_path):
    config = launch_config(tmp_path)
    first = subprocess.run([*PLAIT, "launch", str(config), "--address", ray_head, "--follow"],
                           capture_output=True, text=True, timeout=600, env=client_env(token_file))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SUCCEEDED" in first.stderr and "test accuracy" in first.stdout
    assert TOKEN not in first.stdout + first.stderr  # sent, never shown
    run_dir = tmp_path / "runs" / "launched"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["test"]["fused"]["samples"] == 64
    job_id = next(line.split()[2] for line in first.stderr.splitlines() if line.startswith("submitted job"))
    status = subprocess.run([*PLAIT, "launch", "--status", job_id, "--address", ray_head], capture_output=True,
                            text=True, timeout=120, env=client_env(token=TOKEN))  # $RAY_AUTH_TOKEN works too
    assert status.stdout.strip() == "SUCCEEDED"

    again = subprocess.run([*PLAIT, "launch", str(config), "--address", ray_head, "--follow"],
                           capture_output=True, text=True, timeout=600, env=client_env(token_file))
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps))  # resumed the finished run: nothing trained twice


def test_launch_with_a_wrong_token_is_refused_in_one_line_that_shows_no_token(ray_head, tmp_path):
    wrong = "wrong-token-0123456789"
    result = subprocess.run([*PLAIT, "launch", str(launch_config(tmp_path)), "--address", ray_head],
                            capture_output=True, text=True, timeout=120, env=client_env(token=wrong))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plait: error:") and "auth" in lines[0].lower(), result.stderr
    assert wrong not in result.stdout + result.stderr and TOKEN not in result.stdout + result.stderr


def test_launch_to_an_unreachable_address_fails_fast(tmp_path):
    result = subprocess.run([*PLAIT, "launch", str(launch_config(tmp_path)), "--address", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot reach Ray at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
