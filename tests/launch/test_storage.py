"""Run folders in storage (`run.runs_dir` a URI), through pyarrow.fs with a `file://` URI: the
same calls as for s3:// or gs://, on this machine's disk."""
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_PLUGINS
from safetensors.torch import load_file

from plait.core.errors import ConfigError
from plait.core.hookspecs import hookimpl
from plait.core.loop import fit
from plait.core.runs import load
from plait.launch.ray_runner import check_storage, train
from plait.launch.storage import COMPLETE, RemoteRuns, StorageSync, staging_dir

pytestmark = pytest.mark.slow

def run(write_config, name: str, runs_dir: str, plugins: dict | None = None):
    path = write_config({**TINY_PLUGINS, **(plugins or {})}, name=name, epochs=2, checkpoint_every=5,
                        runs_dir=runs_dir)
    config, _ = load(str(path), [])
    return train(config, json.loads(json.dumps(config.to_dict())))


def test_a_run_in_storage_uploads_and_resumes_on_a_fresh_machine(write_config, tmp_path):
    remote = tmp_path / "bucket" / "runs"
    uri = f"file://{remote}"

    with pytest.raises(Exception, match="stopped at step 7"):
        run(write_config, "stored", uri, {"stop_at": {"step": 7}})
    checkpoints = remote / "stored" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000005", "step-00000006"]
    assert all((p / COMPLETE).is_file() for p in checkpoints.iterdir())
    shutil.rmtree(staging_dir(uri, 0))  # another machine: nothing local
    (checkpoints / "step-00000006" / COMPLETE).unlink()  # as if its upload had been cut short

    results = run(write_config, "stored", uri)  # resumes from step 5, the newest complete one
    whole = run(write_config, "whole", str(tmp_path / "local-runs"))

    assert results["steps"] == whole["steps"] == 12
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000010", "step-00000012"]  # keep 2
    for name in ("config.yaml", "run.json", "metrics.json", "metrics.jsonl"):
        assert (remote / "stored" / name).is_file(), name
    rows = map(json.loads, (remote / "stored" / "metrics.jsonl").read_text().splitlines())
    train_steps = [row["step"] for row in rows if row["split"] == "train"]
    # the stopped attempt's row of step 6 is dropped on resuming from step 5: one row a step
    assert train_steps == [2, 4, 6, 8, 10, 12]
    stored = load_file(str(checkpoints / "step-00000012" / "model.safetensors"))
    local = load_file(str(tmp_path / "local-runs" / "whole" / "checkpoints" / "step-00000012" / "model.safetensors"))
    assert all(torch.equal(stored[k], local[k]) for k in local)  # the same weights as a run never stopped


@pytest.mark.parametrize("runs_dir, expected", [
    ("file:///proc/plait-runs", "cannot write to file:///proc/plait-runs"),
    ("nosuchscheme://bucket/runs", "cannot open nosuchscheme://bucket/runs"),
])
def test_storage_that_cannot_be_used_is_a_clear_error(write_config, runs_dir, expected):
    config, _ = load(str(write_config(runs_dir=runs_dir)), [])
    with pytest.raises(ConfigError, match=f"run.runs_dir: {expected}"):
        check_storage(config)
    assert not Path("file:").exists() and not Path("nosuchscheme:").exists()


def test_nodes_probing_one_folder_at_once_do_not_trip_each_other(tmp_path):
    """Every node of a cluster probes the runs folder at the same moment (`check_storage_on_nodes`);
    one probe must not delete another's file and report the folder unwritable."""
    storage = RemoteRuns(f"file://{tmp_path / 'bucket'}", "plugins.yaml")
    failures: list[Exception] = []

    def probe_repeatedly() -> None:
        for _ in range(200):
            try:
                storage.check_writable()
            except ConfigError as exc:
                failures.append(exc)

    probes = [threading.Thread(target=probe_repeatedly) for _ in range(4)]
    for thread in probes:
        thread.start()
    for thread in probes:
        thread.join()
    assert failures == []
    assert list((tmp_path / "bucket").iterdir()) == []  # each probe cleans up after itself


class StepClock:
    """Which optimizer steps have ended, and which wrote a checkpoint; ``wait_for(step)`` waits until that
    step has ended (False after ``timeout`` seconds)."""

    def __init__(self) -> None:
        self.ended, self.saved = 0, set()
        self.changed = threading.Condition()

    @hookimpl
    def plait_batch_end(self, state, batch, outputs, loss):
        with self.changed:
            self.ended = state.step
            self.changed.notify_all()

    @hookimpl
    def plait_checkpoint_saved(self, state, path):
        self.saved.add(state.step)

    def wait_for(self, step: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.ended >= step, timeout)


class SlowStorage(RemoteRuns):
    """A `file://` runs folder whose checkpoint upload cannot finish before training has ended the next step
    (or its last): an upload that held training up would wait for ever (here: ``timeout``). It notes whether
    each upload saw that step end, and how many uploads ran at once."""

    def __init__(self, uri: str, clock: StepClock, last_step: int, timeout: float = 20.0) -> None:
        super().__init__(uri)
        self.clock, self.last_step, self.timeout = clock, last_step, timeout
        self.saw_training_go_on: list[bool] = []
        self.in_flight, self.most_in_flight = 0, 0
        self.lock = threading.Lock()

    def upload_checkpoint(self, name, folder, kept):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        step = int(folder.name.removeprefix("step-"))
        self.saw_training_go_on.append(self.clock.wait_for(min(step + 1, self.last_step), self.timeout))
        super().upload_checkpoint(name, folder, kept)
        with self.lock:
            self.in_flight -= 1


def test_uploads_run_beside_training_one_at_a_time_marker_last(write_config, tmp_path):
    """A checkpoint every 2 steps, each upload held until training has ended the step after it: training
    goes on while an upload runs (a blocking upload would wait for ever), one upload at a time, and every
    uploaded checkpoint is whole, its marker written last. No clock is read: this holds on a loaded machine."""
    remote = tmp_path / "bucket"
    config, plugins = load(str(write_config(name="slow", epochs=3, checkpoint_every=2, keep_checkpoints=2)), [])
    uploads, clock = StorageSync(f"file://{remote}", config.source), StepClock()
    uploads.remote = SlowStorage(uploads.uri, clock, last_step=18)  # 3 epochs of 6 steps
    plugins.register(uploads, name="plait-storage")
    plugins.register(clock, name="clock")
    fit(config, plugins)

    storage = uploads.remote
    assert storage.most_in_flight == 1 and len(storage.saw_training_go_on) == len(clock.saved) == 9
    assert all(storage.saw_training_go_on), storage.saw_training_go_on
    kept = sorted((remote / "slow" / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000016", "step-00000018"]
    for folder in kept:
        files = [f for f in folder.rglob("*") if f.is_file()]
        marker = folder / COMPLETE
        assert marker in files and all(f.stat().st_mtime_ns <= marker.stat().st_mtime_ns for f in files)
    assert not (tmp_path / "runs" / ".upload-slow").exists()  # the snapshot is gone once uploaded
