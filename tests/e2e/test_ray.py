"""Real Ray Train on this machine: 2 CPU workers, one Ray session for the module."""
import json
import logging
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import PLUGINS_FOR_TESTS

from plait.core.config import load_config
from plait.core.errors import ConfigError, PlaitError
from plait.core.runs import prepare
from plait.launch import ray_runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS)}})
    yield
    ray.shutdown()


def configure(write_config, plugins=None, name="ray", **run):
    from conftest import TINY_PLUGINS

    path = write_config({**TINY_PLUGINS, **(plugins or {})}, name=name, **run)
    data = yaml.safe_load(path.read_text())
    return path, data


def run_ray(path, overrides=()):
    raw = load_config(path, list(overrides))
    config, _ = prepare(raw, str(path))
    return config, ray_runner.train(config, raw)


def test_two_workers_train_and_count_each_test_sample_once(write_config):
    from mlflow import MlflowClient

    path, _ = configure(write_config, {"mlflow": {"log_model": False}}, epochs=2, log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2"])
    assert results["world_size"] == 2 and results["steps"] == 6  # 192 samples / (2 x 32) x 2 epochs
    assert results["test"]["fused"]["samples"] == 64  # an exact partition, no padded duplicates
    run_dir = Path(config.run.runs_dir) / config.run.name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes
    assert all(len(r["peak_memory_mb"]) == 2 for r in rows if r["split"] == "train")  # each worker's peak
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
    # one MLflow run, from rank 0 alone, with each step once
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(config.run.runs_dir).resolve() / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("plait").experiment_id])
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    # what the workers reported is what the saved model scores: every worker evaluated with rank
    # 0's batch-norm statistics, the ones the checkpoint holds
    from plait.launch.evaluate import evaluate_run

    for modality, reported in results["test"].items():
        alone = evaluate_run(run_dir, modalities=None if modality == "fused" else [modality])
        assert alone["accuracy"] == reported["accuracy"], modality
        assert alone["loss"] == pytest.approx(reported["loss"], rel=1e-5), modality


def test_moe_fusion_trains_with_two_ddp_workers(write_config):
    path, _ = configure(write_config, {"moe": {"experts": 4, "top_k": 2}}, name="moe-ddp", log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2"])
    assert results["world_size"] == 2 and results["steps"] == 3
    rows = list(map(json.loads, (Path(config.run.runs_dir) / "moe-ddp" / "metrics.jsonl").read_text().splitlines()))
    for row in (r for r in rows if r["split"] == "train"):  # averaged over both workers
        assert row["moe_aux"] > 0 and sum(row[f"moe0_load{e}"] for e in range(4)) == pytest.approx(1.0)


def test_distillation_runs_with_two_workers(write_config, tmp_path):
    from plait.core.loop import fit
    from plait.core.runs import load
    from plait.testing import TINY_PLUGINS
    from plait.testing import write_config as write_in

    teacher = fit(*load(str(write_in(tmp_path, TINY_PLUGINS, name="teacher")), [])).run_dir
    student = {"spoken_digits": TINY_PLUGINS["spoken_digits"], "audio_encoder": {"channels": [4, 8], "dim": 16},
               "fusion": {"dim": 16, "heads": 2, "ce_weight": 0.1},
               # the projections (8 -> 16 channels, 16 -> 32) are trained by both workers, kept in step by DDP
               "distill": {"teacher": str(teacher), "hidden": [{"student": "encoders.audio.cnn",
                                                                 "teacher": "encoders.audio.cnn"}],
                           "embedding": 0.5, "embedding_modalities": ["audio"]}}
    path = write_config(student, name="kd-ddp", log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2"])
    assert results["world_size"] == 2 and results["steps"] == 3
    rows = list(map(json.loads, (Path(config.run.runs_dir) / "kd-ddp" / "metrics.jsonl").read_text().splitlines()))
    assert all(r["kd"] > 0 and r["hidden"] > 0 and r["embedding"] > 0 for r in rows if r["split"] == "train")
    assert (Path(config.run.runs_dir) / "kd-ddp" / "report.md").is_file()  # rank 0 wrote it


def test_fsdp_shards_the_model_over_two_ray_workers(write_config):
    from plait.launch.evaluate import evaluate_run

    path, _ = configure(write_config, name="fsdp", log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2", "scaling.strategy=fsdp"])
    assert results["world_size"] == 2 and results["steps"] == 3
    assert results["test"]["fused"]["samples"] == 64
    # the checkpoint holds the whole model, which `plait eval` loads into one process
    again = evaluate_run(Path(config.run.runs_dir) / config.run.name)
    assert again["accuracy"] == results["test"]["fused"]["accuracy"] and again["samples"] == 64


def test_tensor_and_expert_parallel_runs_over_two_ray_workers(write_config):
    from plait.launch.evaluate import evaluate_run

    path, _ = configure(write_config, name="tp", log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2", "scaling.tensor_parallel=2"])
    # one data replica: the pair reads each batch together, 192 samples / 32 = 6 steps, each sample once
    assert results["world_size"] == 2 and results["steps"] == 6
    assert results["test"]["fused"]["samples"] == 64
    again = evaluate_run(Path(config.run.runs_dir) / config.run.name)  # whole weights, in one process
    assert again["accuracy"] == pytest.approx(results["test"]["fused"]["accuracy"])
    path, _ = configure(write_config, {"moe": {"experts": 4, "top_k": 2}}, name="ep", log_every=1)
    config, results = run_ray(path, ["scaling.num_workers=2", "scaling.expert_parallel=2"])
    assert results["world_size"] == 2 and results["steps"] == 3 and results["test"]["fused"]["samples"] == 64


def test_a_failed_worker_is_restarted_by_ray_and_resumes_from_storage(write_config, tmp_path):
    # The runs folder is a storage URI: restarted workers fill their folders from it afresh.
    marker, remote = tmp_path / "failed-once", tmp_path / "bucket"
    path, _ = configure(write_config, {"fail_once": {"marker": str(marker), "at_step": 5}}, name="restart",
                        epochs=2, log_every=1, checkpoint_every=2, runs_dir=f"file://{remote}")
    _config, results = run_ray(path, ["scaling.num_workers=2", "scaling.max_failures=1"])
    assert marker.exists()  # it did fail
    assert results["steps"] == 6
    steps = [json.loads(line)["step"] for line in (remote / "restart" / "metrics.jsonl")
             .read_text().splitlines() if json.loads(line)["split"] == "train"]
    # Rows logged after the step-4 checkpoint were never uploaded; the restarted workers took
    # steps 1-4 (and their rows) from storage and trained 5 and 6 again. A restart from scratch
    # would have logged 1-4 twice.
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (remote / "restart" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_without_retries_the_error_names_rank_plugin_and_hook(write_config, tmp_path):
    path, _ = configure(write_config, {"fail_once": {"marker": str(tmp_path / "m"), "at_step": 1}}, name="fails")
    with pytest.raises(PlaitError) as err:
        run_ray(path, ["scaling.num_workers=2"])
    message = str(err.value)
    assert "worker rank 1" in message and "'fail_once'" in message and "plait_batch_start" in message
    assert "injected failure at step 1" in message


def test_a_worker_that_dies_is_named_with_its_log_and_the_run_resumes(write_config, tmp_path):
    marker = tmp_path / "aborted"
    path, _ = configure(write_config, {"fail_once": {"marker": str(marker), "at_step": 4, "how": "abort"}},
                        name="aborts", epochs=2, log_every=1, checkpoint_every=2)
    with pytest.raises(PlaitError) as err:
        run_ray(path, ["scaling.num_workers=2"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("worker rank 1 died ("), message
    log = Path(re.search(r"its log: [\d.]+:(\S+);", message).group(1))
    assert "Fatal Python error: Aborted" in log.read_text(), "the log named is that worker's, with the crash"
    # rank 0 may or may not have written step 4's checkpoint before its peer's death stopped it
    assert re.search(r"the newest checkpoint, step-0000000[24], is kept: the same command resumes from it", message)
    config, results = run_ray(path, ["scaling.num_workers=2"])  # the same command again
    assert results["steps"] == 6
    rows = list(map(json.loads, (Path(config.run.runs_dir) / "aborts" / "metrics.jsonl").read_text().splitlines()))
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6], "no row lost or repeated"


@pytest.mark.parametrize("overrides, expected", [
    (["scaling.num_workers=3"], "3 workers x 1 CPU = 3 CPU, but the Ray cluster has 2"),
    (["scaling.num_workers=1", "scaling.use_gpu=true"], "no GPU in the cluster"),
    (["scaling.num_workers=1", "run.runs_dir=/proc/plait-runs"], "cannot write"),
])
def test_what_cannot_run_fails_fast_and_clearly(write_config, overrides, expected):
    path, _ = configure(write_config)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=expected):
        run_ray(path, overrides)
    assert time.perf_counter() - started < 30


def test_an_unreachable_address_fails_fast(write_config):
    path, _ = configure(write_config)
    raw = load_config(path, ["scaling.num_workers=1"])
    _config, _ = prepare(raw, str(path))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot reach Ray at 127.0.0.1:9"):
        ray_runner.check_reachable("127.0.0.1:9")
    assert time.perf_counter() - started < 30


def test_domain_transforms_run_in_ray_workers_sharing_one_index(write_config, tmp_path):
    cache = tmp_path / "legal-cache"
    plugins = {"medical": {}, "legal_rag": {"k": 1, "retriever": "bm25", "cache_dir": str(cache)}}
    path, _ = configure(write_config, plugins, name="domains-ray")
    _config, results = run_ray(path, ["scaling.num_workers=2"])
    assert results["world_size"] == 2 and results["test"]["fused"]["samples"] == 64
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # one index, no half-built folder
