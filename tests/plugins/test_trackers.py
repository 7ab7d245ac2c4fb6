"""The experiment trackers against the real things: an ``mlflow server`` on 127.0.0.1 (SQLite
backend, artifacts in a temp folder) read back through ``MlflowClient``; MLflow's default store
in the runs folder; wandb in offline mode, its run file read record by record."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from plait.testing import train_steps

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, its store a SQLite file, its artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)  # cwd: where it puts ./mlruns
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)
    log.close()


def test_a_run_and_its_resume_log_to_one_mlflow_run_on_a_real_server(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    plugins = {"curves": {}, "mlflow": {"tracking_uri": mlflow_server, "experiment": "trackers-test"}}
    train_steps(tmp_path, plugins, steps=2, checkpoint_every=1)
    state = train_steps(tmp_path, plugins, steps=4, checkpoint_every=1)  # resumes from step 2
    assert state.step == 4

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued it: one run
    assert run.info.run_id == json.loads((state.run_dir / "mlflow.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["plugins.fusion.dim"] == "32" and run.data.params["run.max_steps"] == "2"
    assert run.data.tags["plait.resumed_at_step"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in losses}) == [1, 2, 3, 4]
    logged = {m.step: m.value for m in losses if m.step > 2}
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == {r["step"]: pytest.approx(r["loss"]) for r in rows if r["split"] == "train" and r["step"] > 2}
    assert 0 < run.data.metrics["train/mfu"] <= 1 and run.data.metrics["train/peak_memory_mb/0/rss"] > 0
    assert run.data.metrics["test/fused/accuracy"] == pytest.approx(state.metrics["test"]["fused"]["accuracy"])
    assert run.data.metrics["run/flops_per_sample"] == state.metrics["run"]["flops_per_sample"]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "metrics.jsonl", "curves.png", "run.json", "model"} <= files
    model = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model


def test_mlflow_defaults_to_a_sqlite_store_beside_the_run_folders(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    state = train_steps(tmp_path, {"mlflow": {"log_model": False}}, steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny.yaml"]  # no ./mlflow.db, no ./mlruns
    store = tmp_path / "runs" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("plait").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in files and "model" not in files
    assert (tmp_path / "runs" / "mlartifacts").is_dir() and state.step == 2


def test_an_unreachable_tracking_server_is_one_line_naming_it(tmp_path, monkeypatch):
    from plait.core.errors import ConfigError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries for minutes
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(ConfigError, match=rf"plugins.mlflow: the tracking store {uri} refused the run") as raised:
        train_steps(tmp_path, {"mlflow": {"tracking_uri": uri}}, steps=1)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # it stopped before training


def wandb_records(path: Path):
    """The protobuf records of a wandb run file (``run-ID.wandb``): W&B's LevelDB-style log of
    32 KiB blocks, each record a 7-byte header (checksum, length, type) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        body, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):  # full, first
            pending = body
        else:  # middle, last
            pending += body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_keeps_the_config_and_the_metric_history(tmp_path):
    state = train_steps(tmp_path, {"wandb": {"project": "trackers-test"}}, steps=3)
    run_id = json.loads((state.run_dir / "wandb.json").read_text())["run_id"]
    (run_file,) = (state.run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    config, history, summary, kinds = {}, {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":  # the config given to wandb.init; later changes come as config records
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            assert record.run.project == "trackers-test" and record.run.display_name == "tiny"
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    assert kinds[:2] == ["header", "run"] and kinds[-1] == "exit", f"{run_file}: incomplete after the fit: {kinds}"
    assert "run" in config, f"{run_file}: no plait config among the records {kinds}, config keys {sorted(config)}"
    assert config["run"]["max_steps"] == 3 and config["plugins"]["fusion"]["dim"] == 32
    rows = [json.loads(line) for line in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {step: row["train/loss"] for step, row in history.items()} == \
        {r["step"]: pytest.approx(r["loss"]) for r in rows if r["split"] == "train"}
    assert "val/accuracy" in history[3] and 0 < history[3]["train/mfu"] <= 1
    assert summary["test/fused/accuracy"] == pytest.approx(state.metrics["test"]["fused"]["accuracy"])
