from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from plait.core.config import Options, apply_override, load_config, load_raw, resolve
from plait.core.errors import ConfigError


class Demo(Options):
    experts: int = Field(4, ge=1)
    kind: str = "attention"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_include_merges_beneath_the_including_file(tmp_path):
    write(tmp_path, "base.yaml", "run: {name: base, seed: 1, epochs: 3}\nplugins: {a: {x: 1}}\n")
    top = write(tmp_path, "top.yaml", "include: [base.yaml]\nrun: {name: top}\nplugins: {a: {y: 2}, b: {}}\n")
    data = load_raw(top)
    assert data["run"] == {"name": "top", "seed": 1, "epochs": 3}
    assert data["plugins"] == {"a": {"x": 1, "y": 2}, "b": {}}
    assert list(data["plugins"]) == ["a", "b"]


def test_include_cycle_is_named(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_raw(tmp_path / "a.yaml")


def test_overrides_parse_values_as_yaml():
    data = {"plugins": {"moe": {"experts": 4}}}
    apply_override(data, "plugins.moe.experts=8")
    apply_override(data, "run.lr=1e-3")
    apply_override(data, "plugins.moe.layers=[1, 2]")
    apply_override(data, "run.name=my run")
    assert data["plugins"]["moe"] == {"experts": 8, "layers": [1, 2]}
    assert data["run"] == {"lr": 1e-3, "name": "my run"}


@pytest.mark.parametrize("override", ["novalue", "=3", "run.name.x=1"])
def test_bad_override_is_an_error(override):
    with pytest.raises(ConfigError, match="override"):
        apply_override({"run": {"name": "x"}}, override)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "run:\n  name: x\n  seed: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "malformed YAML" in str(err.value)
    assert ":4:" in str(err.value) or ":3:" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_top_level_key_suggests_nearest(tmp_path):
    path = write(tmp_path, "c.yaml", "plugin: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'plugins'"):
        load_config(path)


def test_unknown_run_key_suggests_nearest(tmp_path):
    path = write(tmp_path, "c.yaml", "run: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"run\.epoch: unknown option \(did you mean 'epochs'\?\)"):
        resolve(load_config(path), {}, str(path))


def test_plugin_options_are_validated_by_the_plugin_schema(tmp_path):
    path = write(tmp_path, "c.yaml", "plugins: {moe: {experts: 8}}\n")
    config = resolve(load_config(path), {"moe": Demo}, str(path))
    assert config.options(Demo).experts == 8
    assert config.to_dict()["plugins"]["moe"] == {"experts": 8, "kind": "attention"}


def test_unknown_plugin_option_suggests_nearest(tmp_path):
    path = write(tmp_path, "c.yaml", "plugins: {moe: {expert: 8}}\n")
    with pytest.raises(ConfigError, match=r"plugins\.moe\.expert: unknown option \(did you mean 'experts'\?\)"):
        resolve(load_config(path), {"moe": Demo}, str(path))


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "c.yaml", "plugins: {moe: {experts: many}}\n")
    with pytest.raises(ConfigError) as err:
        resolve(load_config(path), {"moe": Demo}, str(path))
    message = str(err.value)
    assert str(path) in message and "plugins.moe.experts" in message and "'many'" in message


def test_options_for_plugin_without_schema_are_an_error(tmp_path):
    path = write(tmp_path, "c.yaml", "plugins: {plain: {x: 1}}\n")
    with pytest.raises(ConfigError, match="takes no options"):
        resolve(load_config(path), {"plain": None}, str(path))


def test_empty_plugin_block_means_defaults(tmp_path):
    path = write(tmp_path, "c.yaml", "plugins:\n  moe:\n")
    config = resolve(load_config(path), {"moe": Demo}, str(path))
    assert config.options(Demo) == Demo()



def test_eval_batch_size_follows_batch_size_unless_given():
    from plait.core.config import RunSettings

    assert RunSettings(batch_size=8).eval_batch_size == 8
    assert RunSettings.model_validate({"batch_size": 8, "eval_batch_size": None}).eval_batch_size == 8
    assert RunSettings(batch_size=8, eval_batch_size=3).eval_batch_size == 3
    with pytest.raises(ValidationError) as err:
        RunSettings.model_validate({"batch_size": 0})
    assert [e["loc"] for e in err.value.errors()] == [("batch_size",)]  # one error, not one for each
