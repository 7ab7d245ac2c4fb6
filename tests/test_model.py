"""The multimodal model's wiring: absent modalities skip their encoder, or, for sharded
training, run it idly without changing the result."""
import pytest
import torch
from torch import nn

from plait.core.errors import PluginError
from plait.core.model import MultimodalModel
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


def test_run_every_encoder_keeps_the_result_and_gives_the_idle_encoder_a_zero_gradient():
    plain, idle = model(), model()
    idle.run_every_encoder = True
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


def test_run_every_encoder_needs_an_example_of_the_modality_first():
    idle = model()
    idle.run_every_encoder = True
    with pytest.raises(PluginError, match="no 'b' sample"):
        idle(batch(b_present=False))
