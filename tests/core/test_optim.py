"""Per-part training control (``core.optim``): freezing, learning-rate scales and weight decay per encoder,
fusion and head, as optimizer parameter groups; and the warm-up unfreeze schedule."""
import pytest
import torch

from plait.core.checkpoint import weights_digest
from plait.core.distributed import unwrap
from plait.core.errors import PluginError
from plait.core.hookspecs import hookimpl
from plait.core.manager import Plugins
from plait.core.optim import ParameterGroup, apply_freezing
from plait.testing import train_steps

pytestmark = pytest.mark.timeout(300)


def folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def part(state, prefix: str) -> dict[str, torch.Tensor]:
    """The weights and buffers of one part of a run's model, by name."""
    return {name: value.clone() for name, value in unwrap(state.model).state_dict().items() if name.startswith(prefix)}


def test_lr_scale_and_weight_decay_reach_the_optimizers_groups(tmp_path):
    state = train_steps(tmp_path, {"text_encoder": {"hidden": 32, "layers": 1, "heads": 2, "lr_scale": 0.1,
                                                    "weight_decay": 0.0},
                                   "fusion": {"dim": 32, "heads": 2, "head": {"lr_scale": 3.0}}},
                        steps=2, lr=1e-3, weight_decay=0.05, schedule="constant")
    groups = {group["name"]: group for group in state.optimizer.param_groups}
    assert set(groups) == {"text", "image", "audio", "fusion", "head"}
    assert groups["text"]["lr"] == pytest.approx(1e-4) and groups["text"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == pytest.approx(3e-3) and groups["head"]["weight_decay"] == 0.05
    assert groups["image"]["lr"] == pytest.approx(1e-3) and groups["fusion"]["lr"] == pytest.approx(1e-3)
    model = unwrap(state.model)
    text = {id(p) for p in model.encoders["text"].parameters() if p.requires_grad}
    assert {id(p) for p in groups["text"]["params"]} == text
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


def test_a_frozen_tower_is_unchanged_by_training_weights_and_statistics(tmp_path):
    image = {"timm": "resnet10t", "timm_kwargs": {"channels": [8, 16, 32, 64]}, "freeze": True}
    short = train_steps(folder(tmp_path / "short"), {"image_encoder": image}, steps=1)
    long = train_steps(folder(tmp_path / "long"), {"image_encoder": image}, steps=4)
    assert weights_digest(part(short, "encoders.image.")) == weights_digest(part(long, "encoders.image."))
    assert weights_digest(part(short, "encoders.audio.")) != weights_digest(part(long, "encoders.audio."))
    assert not any(p.requires_grad for p in unwrap(long.model).encoders["image"].parameters())
    assert "image" not in {group["name"] for group in long.optimizer.param_groups}


def test_unfreeze_at_step_holds_a_tower_then_trains_it(tmp_path):
    text = {"hidden": 32, "layers": 1, "heads": 2, "unfreeze_at_step": 2, "dropout": 0.0}
    runs = {steps: train_steps(folder(tmp_path / str(steps)), {"text_encoder": text}, steps=steps, schedule="constant")
            for steps in (1, 2, 3)}
    weights = {steps: weights_digest(part(state, "encoders.text.model.encoder.")) for steps, state in runs.items()}
    assert weights[1] == weights[2] != weights[3]  # held for the first two steps, trained by the third
    head = {steps: weights_digest(part(state, "head.")) for steps, state in runs.items()}
    assert len(set(head.values())) == 3  # the head trained all along
    lrs = {steps: {group["name"]: group["lr"] for group in state.optimizer.param_groups}
           for steps, state in runs.items()}
    assert lrs[1]["text"] == 0.0 and lrs[1]["head"] > 0  # the learning rates of each run's next step
    assert lrs[2]["text"] == lrs[2]["head"] > 0


def test_a_run_with_groups_resumes_bitwise(tmp_path):
    parts = {"text_encoder": {"hidden": 32, "layers": 1, "heads": 2, "lr_scale": 0.5, "unfreeze_at_step": 2},
             "fusion": {"dim": 32, "heads": 2, "head": {"lr_scale": 2.0, "weight_decay": 0.0}}}
    schedule = {"schedule": "constant", "warmup_steps": 3, "checkpoint_every": 2}  # the same LRs however long
    whole = train_steps(folder(tmp_path / "whole"), parts, steps=4, **schedule)
    train_steps(folder(tmp_path / "stopped"), parts, steps=2, **schedule)
    assert (tmp_path / "stopped" / "runs" / "tiny" / "checkpoints" / "step-00000002").is_dir()
    resumed = train_steps(folder(tmp_path / "stopped"), parts, steps=4, **schedule)  # the same run, from step 2
    assert resumed.step == 4
    assert weights_digest(unwrap(resumed.model).state_dict()) == weights_digest(unwrap(whole.model).state_dict())
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in whole.optimizer.param_groups]


def test_two_plugins_claiming_one_module_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    class Claims:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def plait_parameter_groups(self, model, config):
            return [ParameterGroup(name=self.name, module=model[0], lr_scale=2.0)]

    plugins = Plugins()
    plugins.register(Claims("first"), "first")
    plugins.register(Claims("second"), "second")
    with pytest.raises(PluginError, match=r"plugin '\w+': parameter group '\w+' \(0\) is already plugin '\w+''s group"):
        apply_freezing(plugins, None, model)
