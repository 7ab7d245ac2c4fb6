"""data.engine: ray on a real local Ray: decoding on Ray Data's own CPU workers, batches to 2 Train workers."""
import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import PLUGINS_FOR_TESTS

from plait.core.config import load_config
from plait.core.errors import PlaitError
from plait.core.runs import prepare
from plait.launch import ray_runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    # 2 Train workers of 1 CPU and the decoding workers' data.cpus 1, and not one CPU more: a part of the data
    # pipeline that asked for a CPU of its own would wait for ever (more logical CPUs than this machine's 2)
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS)}})
    yield
    ray.shutdown()


def run(tmp_path, name, engine, plugins=None, **run_settings):
    from plait.testing import TINY_PLUGINS

    chosen = {k: v for k, v in TINY_PLUGINS.items() if k != "augment"}  # no random transforms: same batches
    config = {"run": {"name": name, "runs_dir": str(tmp_path / "runs"), "epochs": 2, "batch_size": 32,
                      "eval_batch_size": 64, "log_every": 1, **run_settings},
              "scaling": {"num_workers": 2}, "data": {"engine": engine, "cpus": 1},
              "plugins": {**chosen, **(plugins or {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    raw = load_config(path)
    checked, _ = prepare(raw, str(path))
    return ray_runner.train(checked, raw)


@pytest.mark.timeout(600)
def test_ray_data_trains_the_same_model_as_the_dataloader(tmp_path):
    loader, streamed = run(tmp_path, "torch", "torch"), run(tmp_path, "ray", "ray")
    # the same samples in the same batches on each worker, decoded elsewhere: the same weights, so the same scores
    for modality, scores in loader["test"].items():
        assert streamed["test"][modality]["accuracy"] == scores["accuracy"], modality
        assert streamed["test"][modality]["loss"] == pytest.approx(scores["loss"], rel=1e-5), modality
    assert streamed["steps"] == loader["steps"] == 6


@pytest.mark.timeout(600)
def test_a_resumed_run_reads_exactly_the_batches_it_had_not_trained_on(tmp_path):
    from sample_log import counted_rows

    log = tmp_path / "samples.jsonl"
    with pytest.raises(PlaitError, match="stopped at step 4"):  # one batch into the second epoch
        run(tmp_path, "resumed", "ray", {"sample_log": {"path": str(log)}, "stop_at": {"step": 4}},
            checkpoint_every=1)
    before = [json.loads(line) for line in log.read_text().splitlines()]
    results = run(tmp_path, "resumed", "ray", {"sample_log": {"path": str(log)}}, checkpoint_every=1)
    assert results["steps"] == 6
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    after = rows[len(before):]
    assert {r["step"] for r in after} == {5, 6}  # it went on from the checkpoint of step 4
    second_epoch = [i for r in counted_rows(log) if r["epoch"] == 1 for i in r["ids"]]
    assert sorted(second_epoch) == list(range(192))  # every sample of the epoch once: no repeat, no gap
    seen_before = {i for r in before if r["epoch"] == 1 for i in r["ids"]}
    assert seen_before and seen_before.isdisjoint(i for r in after for i in r["ids"])
    assert Path(tmp_path / "runs" / "resumed" / "metrics.json").is_file()
