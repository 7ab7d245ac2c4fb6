"""Run folders in storage (`run.runs_dir` a URI), through pyarrow.fs with a `file://` URI: the
same calls as for s3:// or gs://, on this machine's disk."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_PLUGINS
from safetensors.torch import load_file

from plait.core.errors import ConfigError
from plait.core.runs import load
from plait.launch.ray_runner import check_storage, train
from plait.launch.storage import COMPLETE, staging_dir

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
