"""Test helpers for plugin authors: train a couple of steps with your plugin in seconds.

With plait installed, pytest finds the ``plait_run`` fixture by itself (a ``pytest11`` entry
point)::

    def test_my_plugin_trains(plait_run):
        state = plait_run({"my_plugin": {"weight": 0.5}})
        assert state.step == 2 and "my_term" in state.metrics["train"]

``plait_run(plugins, steps=2, **run)`` trains the tiny built-in set (a small ``spoken_digits``
and small encoders) plus ``plugins`` (after the built-ins, in their order) in this process, in
a temporary runs folder, and returns the final ``RunState``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

#: A small but real plugin set: trains in seconds on a CPU.
TINY_PLUGINS: dict[str, dict[str, Any]] = {
    "spoken_digits": {"train_size": 192, "val_size": 64, "test_size": 64, "renderings": 2, "eval_renderings": 1,
                      "languages": ["en", "de"], "p_missing": 0.1, "p_corrupt": 0.05},
    "augment": {},
    "text_encoder": {"hidden": 32, "layers": 1, "heads": 2},
    "image_encoder": {"timm": "resnet10t", "timm_kwargs": {"channels": [8, 16, 32, 64]}},
    "audio_encoder": {"channels": [8, 16], "dim": 32},
    "fusion": {"dim": 32, "heads": 2, "contrastive_weight": 0.1},
}


def write_config(folder: Path, plugins: dict[str, Any], name: str = "tiny", **run: Any) -> Path:
    """A config file in ``folder`` whose runs folder is ``folder / "runs"``."""
    config = {"run": {"name": name, "runs_dir": str(folder / "runs"), "epochs": 1, "batch_size": 32,
                      "eval_batch_size": 64, "lr": 3e-3, "log_every": 1, **run},
              "plugins": plugins}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_steps(folder: Path, plugins: dict[str, Any] | None = None, steps: int = 2, **run: Any):
    """Train ``steps`` optimizer steps of the tiny set plus ``plugins``; return the ``RunState``."""
    from plait.core.loop import fit
    from plait.core.runs import load

    path = write_config(folder, {**copy.deepcopy(TINY_PLUGINS), **(plugins or {})}, max_steps=steps, **run)
    return fit(*load(path))


@pytest.fixture
def plait_run(tmp_path: Path) -> Callable[..., Any]:
    """``plait_run(plugins, steps=2, **run)``: see the module docstring."""

    def run(plugins: dict[str, Any] | None = None, steps: int = 2, **settings: Any):
        return train_steps(tmp_path, plugins, steps, **settings)

    return run
