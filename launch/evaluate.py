"""``plait eval``: rebuild a run's model from its folder and measure it on data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plait.core import checkpoint
from plait.core.config import load_config
from plait.core.errors import DataError, nearest
from plait.core.loop import RUN_INFO, build_dataset, evaluate, make_loader, pick_device
from plait.core.model import build_model
from plait.core.state import RunState


def load_run(run_dir: Path, data: str | None = None):
    """(config, plugins, state with the newest checkpoint's weights, run info) of a run folder.

    With ``data``, the ``manifest`` plugin answers for the test split, shaped like the
    run's training data (class names, image size).
    """
    from plait.launch.cli import prepare

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


def evaluate_run(run_dir: Path, data: str | None = None, modalities: list[str] | None = None) -> dict[str, Any]:
    """Accuracy and loss of the run's model on its test split or on the manifest ``data``."""
    config, plugins, state = load_run(run_dir, data)
    for modality in modalities or []:
        if modality not in state.modalities:
            raise DataError(f"--modalities: the model has no '{modality}' encoder{nearest(modality, state.modalities)}; "
                            f"it has {list(state.modalities)}")
    dataset = build_dataset(plugins, config, "test")
    if dataset is None:
        raise DataError(f"{run_dir}: the run's data set has no test split; pass --data MANIFEST")
    loader = make_loader(dataset, config.run.eval_batch_size, False, config.run.seed, config.run.loader_workers)
    keep = set(modalities) if modalities else None
    metrics = evaluate(state, loader, keep)
    metrics["modalities"] = sorted(keep) if keep else list(state.modalities)
    return metrics
