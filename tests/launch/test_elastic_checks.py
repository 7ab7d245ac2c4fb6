"""Elastic ranges (``scaling.num_workers: [min, max]``): what cannot run is one line before Ray starts,
and a resume on another number of data replicas goes on from the same sample."""
import pytest
from conftest import TINY_PLUGINS

from plait.core.config import ScalingSettings, load_config, validate
from plait.core.errors import ConfigError
from plait.core.parallel import mesh_shape
from plait.core.resume import epoch_position
from plait.core.runs import prepare
from plait.core.state import RunState
from plait.launch.ray_runner import check_elastic, elastic_accumulation, ray_scaling


@pytest.mark.parametrize("value, expected", [
    ([0, 2], "needs 1 <= min <= max"), ([3, 1], "needs 1 <= min <= max"), ([1, 2, 3], "expected a worker count"),
    ("two", "expected a worker count"), (-1, r"0 \(in-process\) or more"), ([1.5, 2], "expected a worker count"),
])
def test_a_range_that_is_not_min_max_is_one_line(value, expected):
    with pytest.raises(ConfigError, match=f"run.yaml: scaling.num_workers: .*{expected}") as err:
        validate(ScalingSettings, {"num_workers": value}, "run.yaml", "scaling")
    assert "\n" not in str(err.value)


def test_a_range_maps_to_ray_trains_elastic_mode():
    scaling = ScalingSettings(num_workers=[1, 2], elastic_resize_interval_s=5)
    assert scaling.elastic and (scaling.min_workers, scaling.max_workers) == (1, 2)
    assert ray_scaling(scaling)["num_workers"] == (1, 2)
    assert ray_scaling(scaling)["elastic_resize_monitor_interval_s"] == 5
    assert ScalingSettings(num_workers=[2, 2]).num_workers == 2  # no range at all


def config_with(tmp_path, **settings):
    from plait.testing import write_config

    path = write_config(tmp_path, TINY_PLUGINS, "elastic", grad_accumulation=settings.pop("accumulation", 1))
    raw = load_config(path, [f"scaling.{k}={v}" for k, v in settings.items()])
    return prepare(raw, str(path))[0]


def test_the_global_batch_is_kept_by_accumulation_or_the_range_is_refused(tmp_path):
    config = config_with(tmp_path, num_workers="[1,4]", accumulation=1)
    with pytest.raises(ConfigError, match=r"scaling.num_workers: \[1, 4\]: .* must divide 4 x run.grad_accumulation "
                                          r"= 4, and 3 does not; set run.grad_accumulation to 3$"):
        check_elastic(config)
    config = config_with(tmp_path, num_workers="[1,4]", accumulation=3)
    check_elastic(config)
    assert [elastic_accumulation(config, n) for n in (1, 2, 3, 4)] == [12, 6, 4, 3]  # 12 batches a step


def test_an_elastic_range_runs_data_parallelism_only():
    with pytest.raises(ConfigError, match="an elastic range runs data parallelism only"):
        mesh_shape(ScalingSettings(num_workers=[2, 4], tensor_parallel=2, strategy="fsdp"), "run.yaml")


@pytest.mark.parametrize("done, saved, now, expected", [
    (2, 2, 1, 4),  # 2 batches on each of 2 replicas = the first 128 samples = 4 batches on one
    (4, 1, 2, 2),
    (3, 2, 1, 6),  # the end of the epoch
])
def test_the_epoch_position_is_kept_across_a_resize(tmp_path, done, saved, now, expected):
    config = config_with(tmp_path)  # batch_size 32, 192 samples
    state = RunState(config=config, plugins=None, run_dir=tmp_path, device=None, model=None, rank=0, world_size=now,
                     tensor_parallel=1, batches_per_epoch=192 // (32 * now))
    assert epoch_position(state, done, saved) == expected


def test_a_position_inside_a_batch_of_the_new_replicas_is_an_error(tmp_path):
    state = RunState(config=config_with(tmp_path), plugins=None, run_dir=tmp_path, device=None, model=None, rank=0,
                     world_size=2,
                     tensor_parallel=1, batches_per_epoch=3)
    with pytest.raises(ConfigError, match="falls inside a batch"):
        epoch_position(state, 1, 1)  # 32 samples: half a step of 2 x 32
