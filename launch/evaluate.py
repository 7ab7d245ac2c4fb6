"""``plait eval``: rebuild a run's model from its folder and measure it on data."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from plait.core.data import build_dataset, make_loader
from plait.core.errors import DataError, nearest
from plait.core.evaluation import evaluate
from plait.core.runs import load_run


def evaluate_run(run_dir: Path, data: str | None = None, modalities: list[str] | None = None) -> dict[str, Any]:
    """Accuracy and loss of the run's model on its test split or on the manifest ``data``."""
    config, plugins, state = load_run(run_dir, data)
    for modality in modalities or []:
        if modality not in state.modalities:
            raise DataError(f"--modalities: the model has no '{modality}' encoder"
                            f"{nearest(modality, state.modalities)}; it has {list(state.modalities)}")
    dataset = build_dataset(plugins, config, "test")
    if dataset is None:
        raise DataError(f"{run_dir}: the run's data set has no test split; pass --data MANIFEST")
    loader = make_loader(dataset, config.run.eval_batch_size, False, config.run.seed, config.run.loader_workers)
    keep = set(modalities) if modalities else None
    metrics: dict[str, Any] = dict(evaluate(state, loader, keep, split="test"))
    metrics["modalities"] = sorted(keep) if keep else list(state.modalities)
    return metrics
