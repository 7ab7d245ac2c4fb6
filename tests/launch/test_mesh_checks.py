"""A mesh that the workers or the model cannot take is one line, before any worker starts
(``ray_runner.check_mesh``, which ``train`` calls before it connects to Ray)."""
import copy

import pytest
from conftest import TINY_PLUGINS

from plait.core.config import ScalingSettings
from plait.core.errors import ConfigError
from plait.core.parallel import MeshShape, mesh_shape
from plait.core.runs import prepare
from plait.launch.ray_runner import check_mesh


@pytest.mark.parametrize("scaling, expected", [
    ({"num_workers": 2, "tensor_parallel": 4}, "tensor_parallel: 4 is more than the 2 worker"),
    ({"num_workers": 2, "expert_parallel": 4}, "expert_parallel: 4 is more than the 2 worker"),
    ({"num_workers": 2, "data_parallel": 2, "tensor_parallel": 2},
     "data_parallel 2 x tensor_parallel 2 = 4 workers, but scaling.num_workers is 2"),
    ({"num_workers": 3, "tensor_parallel": 2}, "tensor_parallel: 2 does not divide the 3 workers"),
    ({"num_workers": 3, "expert_parallel": 2}, "expert_parallel: 2 does not divide the 3 data-parallel"),
    ({"num_workers": 4, "tensor_parallel": 2}, "needs strategy: fsdp"),
    ({"num_workers": 4, "tensor_parallel": 2, "expert_parallel": 2, "strategy": "fsdp"}, "not supported yet"),
])
def test_a_mesh_the_workers_cannot_take_is_one_line(scaling, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        mesh_shape(ScalingSettings(**scaling), "run.yaml")
    assert "\n" not in str(error.value) and str(error.value).startswith("run.yaml: scaling")


def test_sharded_checkpoints_with_fsdp_and_tensor_parallelism_are_refused_in_one_line():
    scaling = ScalingSettings(num_workers=4, tensor_parallel=2, strategy="fsdp")
    with pytest.raises(ConfigError, match="run.checkpoint_format: sharded with FSDP x tensor_parallel"):
        mesh_shape(scaling, "run.yaml", "sharded")
    mesh_shape(ScalingSettings(num_workers=2, tensor_parallel=2), "run.yaml", "sharded")  # one replica: supported


def test_the_mesh_is_the_workers_divided():
    assert mesh_shape(ScalingSettings(num_workers=4, tensor_parallel=2, strategy="fsdp")) == MeshShape(2, 2, 1)
    assert mesh_shape(ScalingSettings(num_workers=4, expert_parallel=2)) == MeshShape(4, 1, 2)
    assert mesh_shape(ScalingSettings(num_workers=0)) == MeshShape(1, 1, 1)


def checked(plugins: dict, tmp_path, **scaling) -> None:
    raw = {"run": {"name": "mesh", "runs_dir": str(tmp_path)}, "scaling": {"num_workers": 2, **scaling},
           "plugins": plugins}
    config, _ = prepare(copy.deepcopy(raw), "run.yaml")
    check_mesh(config, raw)


def test_tensor_parallel_that_does_not_divide_the_heads_is_one_line(tmp_path):
    plugins = {**TINY_PLUGINS, "text_encoder": {"hidden": 30, "layers": 1, "heads": 3}}
    with pytest.raises(ConfigError, match="tensor_parallel: 2 does not divide the text encoder's 3 attention heads"):
        checked(plugins, tmp_path, tensor_parallel=2)
    plugins = {**TINY_PLUGINS, "fusion": {"dim": 33, "heads": 3}}
    with pytest.raises(ConfigError, match="does not divide the 3 attention heads of the fusion"):
        checked(plugins, tmp_path, tensor_parallel=2)


def test_tensor_parallel_on_a_model_without_a_plan_is_one_line(tmp_path):
    plugins = {"spoken_digits": TINY_PLUGINS["spoken_digits"], "audio_encoder": TINY_PLUGINS["audio_encoder"],
               "fusion": {"kind": "concat", "dim": 16}}
    with pytest.raises(ConfigError, match="no module of the model has a tensor-parallel plan"):
        checked(plugins, tmp_path, tensor_parallel=2)


def test_expert_parallel_that_does_not_divide_the_experts_is_one_line(tmp_path):
    plugins = {**TINY_PLUGINS, "moe": {"experts": 3}}
    with pytest.raises(ConfigError, match="expert_parallel: 2 does not divide plugins.moe.experts: 3"):
        checked(plugins, tmp_path, expert_parallel=2)
    with pytest.raises(ConfigError, match="the model has no experts to split"):
        checked(dict(TINY_PLUGINS), tmp_path, expert_parallel=2)


def test_a_mesh_the_model_can_take_passes(tmp_path):
    checked({**TINY_PLUGINS, "moe": {"experts": 4}}, tmp_path, expert_parallel=2)
    checked(dict(TINY_PLUGINS), tmp_path, tensor_parallel=2)
