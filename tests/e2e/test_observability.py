"""Trackers, profiler and efficiency figures on 2 CPU workers (a real gloo process group, plait's own
``fit``): only rank 0 logs to MLflow and wandb, ``profile: {ranks: all}`` writes one trace per
worker, and every row lists each worker's peak memory with MFU over both workers' peaks."""
import json

import pytest
import torch.multiprocessing as mp
import yaml
from conftest import TINY_PLUGINS, free_port, spawn
from test_fsdp import _worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _summary(state) -> dict:
    return {"rank": state.rank, "run": {k: v for k, v in state.metrics["run"].items() if k != "test"}}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    config = {"run": {"name": "watched", "runs_dir": str(root / "runs"), "epochs": 1, "max_steps": 4,
                      "batch_size": 16, "eval_batch_size": 32, "log_every": 1},
              "plugins": {**TINY_PLUGINS, "mlflow": {"log_model": False}, "wandb": {},
                          "profile": {"start_step": 1, "steps": 2, "ranks": "all"}}}
    path = root / "watched.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_worker, 2, free_port(), {"watched": (str(path), "ddp")}, results, _summary)
        return {"root": root, "run_dir": root / "runs" / "watched", **dict(results)}


def test_only_rank_0_logs_one_mlflow_run_and_one_wandb_run(two_workers):
    from mlflow import MlflowClient

    assert all("error" not in two_workers[rank]["watched"] for rank in (0, 1))
    client = MlflowClient(tracking_uri=f"sqlite:///{two_workers['root'] / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("plait").experiment_id])
    assert run.data.tags["plait.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert len(list((two_workers["run_dir"] / "wandb").glob("offline-run-*"))) == 1


def test_each_worker_writes_its_own_trace_when_all_ranks_profile(two_workers):
    for rank in (0, 1):
        trace = json.loads((two_workers["run_dir"] / "profile" / f"trace_rank{rank}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "plait step 2" in names and "fusion.plait_loss_terms" in names


def test_rows_list_every_workers_peak_memory_and_mfu_counts_both_workers(two_workers):
    rows = [json.loads(line) for line in (two_workers["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4 and all(len(r["peak_memory_mb"]) == 2 and 0 < r["mfu"] <= 1 for r in train)
    results = json.loads((two_workers["run_dir"] / "metrics.json").read_text())
    assert len(results["peak_memory_mb"]) == 2 and results["world_size"] == 2
    # the peak MFU divides by is both workers' measured peaks together
    assert results["mfu"] == pytest.approx(results["achieved_tflops"] / results["peak_tflops"], rel=1e-3)
    assert two_workers[1]["watched"]["run"]["flops_per_sample"] == results["flops_per_sample"]  # rank 0's count
