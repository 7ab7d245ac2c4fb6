"""The example plugin packages in examples/, installed from their folders (`make test` does),
used by their entry-point names like any third-party plugin."""
import pytest
import torch
from conftest import TINY_PLUGINS
from safetensors.torch import load_file

from plait.core import checkpoint
from plait.core.loop import fit
from plait.core.manager import list_plugins
from plait.core.runs import load

pytestmark = pytest.mark.slow


def test_the_examples_are_installed_entry_point_plugins():
    found = {info.name: info for info in list_plugins()}
    for name, distribution in (("ema", "plait-ema"), ("tensorboard", "plait-tensorboard")):
        assert found[name].source == "entry point" and found[name].distribution == distribution
        assert found[name].status == "loaded", found[name].error


def test_ema_is_saved_and_resumed_with_the_run(write_config):
    plugins = {**TINY_PLUGINS, "ema": {"decay": 0.9}}
    settings = {"epochs": 2, "checkpoint_every": 4, "batch_size": 32}  # 6 steps an epoch
    whole = fit(*load(str(write_config(plugins, name="ema-whole", **settings)), []))
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        fit(*load(str(write_config({**plugins, "stop_at": {"step": 5}}, name="ema-split", **settings)), []))
    resumed = fit(*load(str(write_config(plugins, name="ema-split", **settings)), []))  # from step 4

    a, b = load_file(str(whole.run_dir / "ema.safetensors")), load_file(str(resumed.run_dir / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the average went on exactly where it stopped
    final = load_file(str(checkpoint.latest(whole.run_dir / "checkpoints") / "model.safetensors"))
    moved = [k for k in a if not torch.equal(a[k], final[k])]
    assert len(moved) > len(a) // 2  # an average, not a copy of the last weights


def test_tensorboard_writes_event_files_tensorboard_reads(write_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state = fit(*load(str(write_config({**TINY_PLUGINS, "tensorboard": {}}, name="tb", log_every=1)), []))
    events = EventAccumulator(str(state.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/accuracy", "test/fused/accuracy"} <= set(tags)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, state.step + 1))
    assert losses[-1] == pytest.approx(state.metrics["train"]["loss"], rel=1e-6)
    assert events.Scalars("test/fused/accuracy")[0].value == pytest.approx(state.metrics["test"]["fused"]["accuracy"])
