"""The multimodal model's wiring: absent modalities skip their encoder, or, for sharded
training, run it idly without changing the result."""
import pytest
import torch
from torch import nn

from plait.core.errors import PluginError
from plait.core.model import MultimodalModel, leaves_parameters_unused, touch
from plait.plugins.fusion import Fusion, FusionOptions


class Encoder(nn.Module):
    out_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.linear = nn.Linear(4, 8)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.linear(self.norm(inputs["x"]))


def model() -> MultimodalModel:
    torch.manual_seed(0)
    fusion = Fusion(FusionOptions(dim=8, heads=2, dropout=0.0, modality_dropout=0.0), {"a": 8, "b": 8})
    return MultimodalModel({"a": Encoder(), "b": Encoder()}, fusion, nn.Linear(8, 3))


def batch(b_present: bool) -> dict:
    generator = torch.Generator().manual_seed(int(b_present))
    return {"label": torch.tensor([0, 1, 2, 1]),
            "present": {"a": torch.ones(4, dtype=torch.bool), "b": torch.full((4,), b_present)},
            "inputs": {m: {"x": torch.randn(4, 4, generator=generator)} for m in "ab"}}


def test_idle_encoders_run_keeps_the_result_and_gives_the_idle_encoder_a_zero_gradient():
    plain, idle = model(), model()
    idle.idle_encoders = "run"
    idle(batch(b_present=True))  # keeps an example row of each modality
    plain(batch(b_present=True))
    stats = idle.encoders["b"].norm.running_mean.clone()

    without_b = batch(b_present=False)
    expected, got = plain(without_b)["logits"], idle(without_b)["logits"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected.sum().backward()
    got.sum().backward()
    assert plain.encoders["b"].linear.weight.grad is None  # skipped: no gradient at all
    assert torch.count_nonzero(idle.encoders["b"].linear.weight.grad) == 0  # ran: a zero gradient
    assert torch.equal(idle.encoders["b"].norm.running_mean, stats)  # ran in eval mode
    assert idle.encoders["b"].training  # and is back in training mode


def test_idle_encoders_run_needs_an_example_of_the_modality_first():
    idle = model()
    idle.idle_encoders = "run"
    with pytest.raises(PluginError, match="no 'b' sample"):
        idle(batch(b_present=False))


def test_idle_encoders_touch_gives_a_zero_gradient_without_running_the_encoder():
    plain, touched = model(), model()
    touched.idle_encoders = "touch"
    assert plain.may_leave_parameters_unused and not touched.may_leave_parameters_unused
    assert leaves_parameters_unused(plain) and not leaves_parameters_unused(touched)
    calls = []
    touched.encoders["b"].register_forward_hook(lambda *_: calls.append(1))
    without_b = batch(b_present=False)
    expected, got = plain(without_b)["logits"], touched(without_b)["logits"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.sum().backward()
    assert not calls
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in touched.encoders["b"].parameters())


def test_touch_gives_a_sparse_embedding_a_sparse_zero_gradient_on_a_real_row():
    module = nn.Sequential(nn.Embedding(10, 4, padding_idx=0, sparse=True), nn.Linear(4, 2))
    module[1].bias.requires_grad_(False)
    touched = touch(module)
    assert touched is not None and float(touched.detach()) == 0.0
    touched.backward()
    grad = module[0].weight.grad
    assert grad.is_sparse and grad._nnz() == 1 and grad.coalesce().indices().tolist() == [[1]]
    assert torch.count_nonzero(grad.to_dense()) == 0
    assert module[1].weight.grad is not None and module[1].bias.grad is None
    assert touch(nn.Linear(2, 2).requires_grad_(False)) is None
