import torch
from safetensors.torch import load_file

from plait.core import checkpoint


def test_flatten_roundtrip_keeps_structure_and_tensors():
    state = {"a": torch.arange(3), "b": [1, {"c": torch.ones(2, 2)}, "x"], "d": {"e": 1.5, "f": None},
             "by_index": {0: {"step": torch.tensor(3.0)}, 1: {}}}
    tensors: dict = {}
    skeleton = checkpoint.flatten(state, tensors)
    assert len(tensors) == 3
    back = checkpoint.unflatten(skeleton, tensors)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"][1]["c"], state["b"][1]["c"])
    assert back["b"][0] == 1 and back["b"][2] == "x" and back["d"] == state["d"]
    assert list(back["by_index"]) == [0, 1] and back["by_index"][0]["step"] == 3.0  # int keys stay ints


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path, 1, model.state_dict(), {"optimizer": optimizer.state_dict()}, keep=1)
    fresh = torch.optim.AdamW(model.parameters(), fused=True)
    fresh.load_state_dict(checkpoint.load(checkpoint.latest(tmp_path), model)["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert float(fresh.state_dict()["state"][0]["step"]) == 1.0


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(3, 2)
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(folder, step, model.state_dict(), {"step": step, "extra": torch.tensor([step])}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == ["step-00000002", "step-00000003"]
    (folder / ".tmp-step-00000004-99").mkdir()  # an interrupted write is never taken for a checkpoint
    assert checkpoint.latest(folder).name == "step-00000003"
    fresh = torch.nn.Linear(3, 2)
    saved = checkpoint.load(checkpoint.latest(folder), fresh)
    assert saved["step"] == 3 and saved["extra"].tolist() == [3]
    assert torch.equal(fresh.weight, model.weight)


def test_loading_into_a_different_model_is_a_clear_error(tmp_path):
    import pytest

    from plait.core.errors import DataError

    checkpoint.save(tmp_path, 1, torch.nn.Linear(3, 2).state_dict(), {}, keep=1)
    with pytest.raises(DataError, match="do not fit.*size mismatch for weight.*new run.name") as err:
        checkpoint.load(checkpoint.latest(tmp_path), torch.nn.Linear(4, 2))
    assert "\n" not in str(err.value)  # one line for the CLI


def test_a_weight_in_another_memory_layout_is_saved_and_read_back(tmp_path):
    # a statically quantized convolution's weight can come out channels-last; safetensors takes only
    # contiguous tensors
    weight = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    saved = checkpoint.save(tmp_path, 1, {"conv.weight": weight}, {}, keep=1)
    assert torch.equal(load_file(str(saved / "model.safetensors"))["conv.weight"], weight)
