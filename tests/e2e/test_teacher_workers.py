"""distill.teacher_workers on a real local Ray: 2 Train workers and the teacher in 1 actor of its own, each batch
sent one ahead; the same student as the teacher in every worker, across a stop and a resume."""
import copy
import json
import logging
import time

import pytest
import torch
import yaml
from conftest import PLUGINS_FOR_TESTS

from plait.core.config import load_config
from plait.core.data import build_dataset, make_loader
from plait.core.errors import ConfigError, PlaitError
from plait.core.loop import fit
from plait.core.runs import load, prepare
from plait.launch import ray_runner
from plait.plugins.distill import (
    DistillOptions,
    RemoteTeacher,
    _capture,
    build_teacher,
    live_outputs,
    start_teacher_workers,
)
from plait.testing import TINY_PLUGINS

pytestmark = pytest.mark.slow

#: no random transforms, so that both runs train on the same batches
PLUGINS = {k: v for k, v in TINY_PLUGINS.items() if k != "augment"}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    # 2 Train workers of 1 CPU and one teacher actor of 1 CPU, and not a CPU more
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from plait.testing import write_config

    folder = tmp_path_factory.mktemp("teacher")
    return fit(*load(str(write_config(folder, copy.deepcopy(PLUGINS), name="teacher", epochs=1)), [])).run_dir


def kd_options(teacher_dir, **more) -> dict:
    return {"teacher": str(teacher_dir), "embedding": 1.0, "embedding_modalities": ["audio", "image"], **more}


def train(tmp_path, name, plugins, **run_settings):
    config = {"run": {"name": name, "runs_dir": str(tmp_path / "runs"), "epochs": 2, "batch_size": 32,
                      "eval_batch_size": 64, "log_every": 1, **run_settings},
              "scaling": {"num_workers": 2}, "plugins": {**copy.deepcopy(PLUGINS), **plugins}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    raw = load_config(path)
    checked, _ = prepare(raw, str(path))
    return ray_runner.train(checked, raw)


def train_rows(tmp_path, name) -> dict[int, dict]:
    """The last training row logged for each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row.get("split") == "train"}


@pytest.mark.timeout(120)
def test_the_actor_gives_the_teachers_own_outputs(teacher_dir):
    import ray

    options = DistillOptions(**kd_options(teacher_dir, teacher_workers=1))
    actors = start_teacher_workers(options, "test")
    remote = RemoteTeacher(actors, rank=0)
    teacher = build_teacher(options)
    states: dict = {}
    for modality in ("audio", "image"):
        _capture(teacher.encoder(modality), states, f"embedding_{modality}")
    config, plugins = prepare({"plugins": copy.deepcopy(PLUGINS)}, "test")
    batch = next(iter(make_loader(build_dataset(plugins, config, "train"), 16, False, 0, 0)))
    remote.send(batch)  # ahead, as plait_batch_loaded does; taken by the same views
    logits, rows, embeddings = remote.outputs(batch)
    with torch.no_grad():
        expected, _, expected_embeddings = live_outputs(teacher, states, batch, ["audio", "image"])
    assert rows is None and torch.allclose(logits, expected, atol=1e-6)
    assert set(embeddings) == {"audio", "image"}
    for modality, embedding in embeddings.items():
        assert torch.allclose(embedding, expected_embeddings[modality], atol=1e-6), modality
    assert remote.classes == teacher.classes
    assert remote.widths == {m: teacher.encoder(m).out_dim for m in ("audio", "image")}
    assert not remote.pending and remote.wait_ms() is not None
    ray.kill(actors[0])  # its CPU back, for the next tests
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.timeout(60)
def test_more_teacher_workers_than_the_cluster_has_is_one_line(teacher_dir):
    options = DistillOptions(**kd_options(teacher_dir, teacher_workers=4))
    with pytest.raises(ConfigError, match=r"teacher_workers: 4 teacher actors of 1 CPU need 4 CPU, and the Ray "
                                          r"cluster has 3 CPU free beside the training workers"):
        start_teacher_workers(options, "test")
    gpus = DistillOptions(**kd_options(teacher_dir, teacher_workers=1, teacher_resources={"GPU": 1}))
    with pytest.raises(ConfigError, match=r"1 teacher actors of 1 GPU need 1 GPU, and the Ray cluster has 0 GPU free"):
        start_teacher_workers(gpus, "test")


@pytest.mark.timeout(900)
def test_two_workers_and_one_teacher_actor_train_and_resume_to_the_live_teachers_student(tmp_path, teacher_dir):
    live = train(tmp_path, "live", {"distill": kd_options(teacher_dir)})
    with pytest.raises(PlaitError, match="stopped at step 4"):
        train(tmp_path, "remote", {"distill": kd_options(teacher_dir, teacher_workers=1), "stop_at": {"step": 4}},
              checkpoint_every=1)
    remote = train(tmp_path, "remote", {"distill": kd_options(teacher_dir, teacher_workers=1)}, checkpoint_every=1)
    assert remote["steps"] == live["steps"] == 6  # 3 steps an epoch: the stop is one step into epoch 2
    ours, theirs = train_rows(tmp_path, "remote"), train_rows(tmp_path, "live")
    assert sorted(ours) == sorted(theirs) == list(range(1, 7))
    for step, row in theirs.items():  # the same soft targets and embeddings, every step, before and after the stop
        for term in ("kd", "embedding", "loss"):
            assert ours[step][term] == pytest.approx(row[term], rel=1e-4), (step, term)
        assert ours[step]["teacher_wait_ms"] >= 0 and "teacher_wait_ms" not in row
    assert remote["test"]["fused"]["accuracy"] == live["test"]["fused"]["accuracy"]
