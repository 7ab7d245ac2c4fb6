"""``plait new-plugin NAME``: a pip-installable plugin package that passes its own tests."""
from __future__ import annotations

import re
from pathlib import Path

from plait.core.errors import ConfigError
from plait.core.hookspecs import API_VERSION

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "plait-{dash}"
version = "0.1.0"
description = "A plait plugin: {name}"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["plait"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This is what makes `{name}:` usable under `plugins:` in a plait config.
[project.entry-points.plait]
{name} = "plait_{name}.plugin"

[tool.setuptools]
packages = ["plait_{name}"]
'''

PLUGIN = '''"""{name}: a plait plugin. It adds an L2 penalty on the fused embedding as a loss term;
replace it with what your plugin does (`plait hooks` lists every hook you can implement)."""
from pydantic import Field

from plait.core.config import Options
from plait.core.hookspecs import hookimpl

# The plait plugin API versions this plugin is written for; another plait refuses it by name.
PLAIT_API = ">={api},<{next_major}"


class {camel}Options(Options):
    """The block under `{name}:` in a config, validated before anything runs."""

    weight: float = Field(0.01, ge=0, description="how much the penalty counts in the loss")


@hookimpl
def plait_config_schema():
    return {camel}Options


@hookimpl
def plait_loss_terms(state, batch, outputs):
    weight = state.config.options({camel}Options).weight
    return {{"{name}_l2": weight * outputs["fused"].float().pow(2).mean()}}
'''

TEST = '''"""{name}'s own tests: it is installed as a plait plugin and trains."""
from plait.core.manager import list_plugins


def test_{name}_is_an_installed_plait_plugin():
    found = {{info.name: info for info in list_plugins()}}
    assert found["{name}"].status == "loaded", found["{name}"].error
    assert "plait_loss_terms" in found["{name}"].hooks


def test_{name}_adds_its_loss_term(plait_run):  # plait_run: plait.testing's fixture
    state = plait_run({{"{name}": {{"weight": 0.5}}}})
    assert state.step == 2
    assert state.metrics["train"]["{name}_l2"] > 0
'''

EXAMPLE = '''# A tiny run with {name}: `plait train example.yaml`
run: {{name: {name}-example, epochs: 1, max_steps: 4, batch_size: 32, log_every: 1}}
plugins:
  spoken_digits: {{train_size: 192, val_size: 64, test_size: 64, renderings: 2, eval_renderings: 1}}
  text_encoder: {{hidden: 32, layers: 1, heads: 2}}
  image_encoder: {{timm: resnet10t, timm_kwargs: {{channels: [8, 16, 32, 64]}}}}
  audio_encoder: {{channels: [8, 16], dim: 32}}
  fusion: {{dim: 32, heads: 2}}
  {name}: {{weight: 0.5}}
'''

README = '''# plait-{dash}

A [plait](https://github.com/) plugin: `{name}`.

```bash
pip install -e .            # registers the `{name}` entry point
pytest                      # its own tests (plait's `plait_run` fixture trains two steps)
plait plugins               # lists {name}
plait train example.yaml    # a tiny run with it
```

In a config:

```yaml
plugins:
  # ... data, encoders, fusion ...
  {name}: {{weight: 0.01}}
```
'''


def scaffold(name: str, folder: Path) -> Path:
    """Write the package ``folder / plait-NAME``; return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"plait new-plugin: '{name}' is not a plugin name: lowercase letters, digits and _ "
                          "(it becomes a Python module name and a config key)")
    dash = name.replace("_", "-")
    root = folder / f"plait-{dash}"
    if root.exists():
        raise ConfigError(f"plait new-plugin: {root} exists already; choose another name or --dir")
    major = int(API_VERSION.split(".")[0])
    values = {"name": name, "dash": dash, "camel": "".join(p.title() for p in name.split("_")),
              "api": API_VERSION, "next_major": major + 1}
    files = {
        "pyproject.toml": PYPROJECT, f"plait_{name}/__init__.py": '"""plait plugin {name}."""\n',
        f"plait_{name}/plugin.py": PLUGIN, "tests/test_plugin.py": TEST, "example.yaml": EXAMPLE,
        "README.md": README,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return root
