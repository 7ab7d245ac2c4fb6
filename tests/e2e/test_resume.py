"""A run stopped mid-epoch and resumed ends with the same weights as an uninterrupted run."""
import pytest
import torch
from safetensors.torch import load_file

from plait.core import checkpoint
from plait.core.loop import fit
from plait.core.runs import load

pytestmark = pytest.mark.slow

PLUGIN_STATE = """
from plait.core.hookspecs import hookimpl
import torch
SEEN = {"batches": 0}

@hookimpl
def plait_batch_end(state):
    SEEN["batches"] += 1

@hookimpl
def plait_state_dict(state):
    return {"batches": SEEN["batches"], "tensor": torch.tensor([SEEN["batches"]])}

@hookimpl
def plait_load_state_dict(state, data):
    SEEN["batches"] = int(data["batches"])
    assert int(data["tensor"][0]) == SEEN["batches"]
"""


def weights(run_dir):
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / "model.safetensors"))


def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path, write_config, monkeypatch):
    from conftest import TINY_PLUGINS

    (tmp_path / "count_batches.py").write_text(PLUGIN_STATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = {"epochs": 2, "checkpoint_every": 5, "batch_size": 32}  # 6 batches an epoch: resume mid-epoch 1

    config, plugins = load(str(write_config({**TINY_PLUGINS, "count_batches": {}}, name="whole", **settings)), [])
    whole = fit(config, plugins)
    import count_batches

    count_batches.SEEN["batches"] = 0
    with pytest.raises(Exception, match="stopped at step 7"):
        config, plugins = load(str(write_config({**TINY_PLUGINS, "count_batches": {}, "stop_at": {"step": 7}},
                                                name="split", **settings)), [])
        fit(config, plugins)
    assert checkpoint.latest(tmp_path / "runs" / "split" / "checkpoints").name == "step-00000006"
    count_batches.SEEN["batches"] = -100  # must come back from the checkpoint
    config, plugins = load(str(write_config({**TINY_PLUGINS, "count_batches": {}}, name="split", **settings)), [])
    resumed = fit(config, plugins)

    assert whole.step == resumed.step == 12
    assert count_batches.SEEN["batches"] == 12
    a, b = weights(whole.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert whole.metrics["test"]["fused"] == resumed.metrics["test"]["fused"]
