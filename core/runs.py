"""Config resolution and run folders: the one way every entry point (the CLI, the Ray workers,
``plait eval``, ``plait compress``, ``plait preprocess``, ``plait.testing``, distillation's
teacher) turns a raw config into a validated config and its loaded plugins, and a run folder
back into its model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import checkpoint, hookspecs
from .config import PlaitConfig, load_config, resolve
from .distributed import pick_device
from .errors import DataError
from .manager import Plugins
from .model import build_model
from .state import RunState

__all__ = ["RUN_INFO", "artifacts", "load", "load_run", "prepare", "run_dir_for"]

#: The run folder's record of what the model was trained on (classes, modalities, data shape).
RUN_INFO = "run.json"


def prepare(data: dict[str, Any], source: str) -> tuple[PlaitConfig, Plugins]:
    """Load the plugins a raw config names and validate it against their schemas."""
    plugins = Plugins().load(data.get("plugins") or {})
    schemas = plugins.call_each(hookspecs.plait_config_schema)
    return resolve(data, schemas, source), plugins


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[PlaitConfig, Plugins]:
    """``prepare`` of a YAML file with ``key.path=value`` overrides."""
    return prepare(load_config(path, overrides), str(path))


def run_dir_for(config: PlaitConfig) -> Path:
    return Path(config.run.runs_dir) / config.run.name


def artifacts(run_dir: Path) -> list[Path]:
    """What an experiment tracker copies of a run folder: its files (config, metrics, plots,
    report.md) and the profiler's folder; not the checkpoints (the model is logged on its own) nor
    a tracker's own folder."""
    return sorted(p for p in run_dir.iterdir()
                  if (p.is_file() and not p.name.startswith("."))  # a dot: a file being written
                  or (p.is_dir() and p.name == "profile"))


def load_run(run_dir: Path, data: str | None = None) -> tuple[PlaitConfig, Plugins, RunState]:
    """(config, plugins, state with the newest checkpoint's weights, in eval mode) of a run folder.

    With ``data``, the ``manifest`` plugin answers for the test split, shaped like the
    run's training data (class names, image size).
    """
    for name in ("config.yaml", RUN_INFO):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir}: not a plait run folder (no {name})")
    newest = checkpoint.latest(run_dir / "checkpoints")
    if newest is None:
        raise DataError(f"{run_dir}: the run has no checkpoint yet")
    info = json.loads((run_dir / RUN_INFO).read_text())
    raw = load_config(run_dir / "config.yaml")
    if data is not None:
        channels, size, _ = info.get("data", {}).get("image_shape", [1, 32, 32])
        manifest = {"test": str(Path(data)), "classes": info["classes"], "image_size": size, "image_channels": channels}
        raw["plugins"] = {"manifest": manifest, **{k: v for k, v in raw["plugins"].items() if k != "manifest"}}
    config, plugins = prepare(raw, str(run_dir / "config.yaml"))
    device = pick_device(config.run.device)
    model = build_model(plugins, config, tuple(info["modalities"]), len(info["classes"])).to(device)
    checkpoint.load(newest, model, device)
    model.eval()
    state = RunState(config=config, plugins=plugins, run_dir=run_dir, device=device, classes=info["classes"],
                     modalities=tuple(info["modalities"]), model=model)
    return config, plugins, state
