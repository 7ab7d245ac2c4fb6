"""Nothing lost: non-finite losses, checkpoints that cannot be written, runs killed at any moment."""
import json
import logging
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import nan_at
import pytest
import torch
from conftest import TINY_PLUGINS

from plait.core import checkpoint
from plait.core.errors import PlaitError
from plait.core.loop import fit
from plait.core.runs import load, load_run
from plait.core.step import NonFiniteLoss


@pytest.mark.parametrize("where, value", [("loss", float("nan")), ("input", float("nan")), ("loss", float("inf"))])
def test_a_non_finite_step_is_skipped_before_the_optimizer_and_names_the_term(write_config, caplog, where, value):
    caplog.set_level(logging.WARNING, logger="plait")
    plugins = {**TINY_PLUGINS, "nan_at": {"steps": [2], "where": where, "value": value}}
    state = fit(*load(str(write_config(plugins, name="poisoned", max_steps=3)), []))
    assert state.nonfinite_steps == 1 and state.step == 3  # one batch skipped, three steps made
    expected = "loss term 'poison' (plugin nan_at)" if where == "loss" else "loss term 'ce' (plugin fusion)"
    assert f"step 3: {expected}" in caplog.text and "the step was skipped" in caplog.text
    assert nan_at.unchanged == [True]  # weights, optimizer-free; BatchNorm statistics put back
    assert all(torch.isfinite(t).all() for t in state.model.state_dict().values() if t.is_floating_point())


def test_too_many_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(write_config):
    plugins = {**TINY_PLUGINS, "nan_at": {"steps": [3]}}
    path = write_config(plugins, name="stops", max_steps=6, checkpoint_every=2, max_nonfinite_steps=0)
    with pytest.raises(NonFiniteLoss, match="step 4: loss term 'poison' \\(plugin nan_at\\) not finite.*the run stops: "
                       "the newest checkpoint, step-00000002, is the last good one"):
        fit(*load(str(path), []))
    run_dir = path.parent / "runs" / "stops"
    assert [c.name for c in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["step-00000002"]
    _, _, state = load_run(run_dir)
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


FULL_DISK_WRITER = """
import resource, signal, sys, torch
from pathlib import Path
from plait.core import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of the process being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))  # model.safetensors needs ~17 kB
try:
    checkpoint.save(Path(sys.argv[1]), 2, torch.nn.Linear(64, 64).state_dict(), {"step": 2}, keep=2)
except checkpoint.CheckpointError as exc:
    print(exc)
"""


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_previous_one_stays(tmp_path):
    """A real write failure: the kernel's file-size limit (EFBIG, as a full disk or a quota fails a
    write), set in a child process so that no other file of this one is limited."""
    folder = tmp_path / "checkpoints"
    model = torch.nn.Linear(64, 64)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save(folder, 1, weights, {"step": 1}, keep=2)
    child = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(folder)], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert re.search("cannot write checkpoint step-00000002: .*File too large.*the newest checkpoint, "
                     "step-00000001, is intact", child.stdout), child.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001"]  # no half-written folder left
    restored = torch.nn.Linear(64, 64)
    assert checkpoint.load(folder / "step-00000001", restored)["step"] == 1
    assert all(torch.equal(weights[k], v) for k, v in restored.state_dict().items())


def test_rewriting_a_step_and_a_killed_writer_leave_complete_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    model = torch.nn.Linear(4, 4)
    checkpoint.save(folder, 3, model.state_dict(), {"step": 3, "pass": 1}, keep=1)
    half = folder / f"{checkpoint.TMP_PREFIX}step-00000004-99999"  # what kill -9 during a write leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.latest(folder).name == "step-00000003"  # never listed
    checkpoint.save(folder, 3, model.state_dict(), {"step": 3, "pass": 2}, keep=1)  # a resumed run writes step 3 again
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003"]  # the leftover is cleaned up
    assert checkpoint.load(folder / "step-00000003", torch.nn.Linear(4, 4))["pass"] == 2


def _newest_step(run_dir) -> int:
    newest = checkpoint.latest(run_dir / "checkpoints")
    return int(newest.name.removeprefix(checkpoint.PREFIX)) if newest else 0


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_run_folder_that_loads_and_resumes(write_config):
    """SIGKILL `plait train` three times at random moments (a checkpoint is written every step, so
    kills land in writes too): every time, the newest complete checkpoint loads, metrics.jsonl has
    only whole lines, and the next start continues from the checkpoint; the fourth start finishes."""
    path = write_config(TINY_PLUGINS, name="killed", epochs=3, checkpoint_every=1, keep_checkpoints=2)
    run_dir = path.parent / "runs" / "killed"
    command = [str(Path(sys.executable).parent / "plait"), "train", str(path), "scaling.num_workers=0"]
    rng = random.Random(0)
    reached = 0
    for target in (2, 7, 12):  # 6 steps an epoch, 18 in all
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while _newest_step(run_dir) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next step or its checkpoint write
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.kill()
        process.wait()
        step = _newest_step(run_dir)
        assert step >= max(target, reached)  # never lost a checkpoint it had
        reached = step
        _, _, state = load_run(run_dir)  # the newest complete checkpoint loads
        assert all(torch.isfinite(p).all() for p in state.model.parameters())
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 18
    assert _newest_step(run_dir) == 18
    assert not list((run_dir / "checkpoints").glob(f"{checkpoint.TMP_PREFIX}*"))


def test_metrics_that_cannot_be_written_stop_the_run_with_one_clear_error(write_config):
    path = write_config(TINY_PLUGINS, name="unwritable", max_steps=2, log_every=1)
    (path.parent / "runs" / "unwritable" / "metrics.jsonl").mkdir(parents=True)  # writing it fails (EISDIR)
    with pytest.raises(PlaitError, match="metrics.jsonl: cannot write the metrics: Is a directory; no checkpoint "
                       "was written yet"):
        fit(*load(str(path), []))
