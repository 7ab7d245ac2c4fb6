"""Writes every metrics row (training, validation) as TensorBoard scalars, tagged
``split/name`` (``train/loss``, ``val/accuracy``, ...), into ``RUN_DIR/tensorboard`` or
``log_dir``; test metrics go in at the end under ``test/``. Main process only.

    plugins:
      ...
      tensorboard: {}        # then: tensorboard --logdir runs/NAME/tensorboard
"""
from __future__ import annotations

from numbers import Number
from pathlib import Path
from typing import Any

from pydantic import Field

from plait.core.config import Options
from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

PLAIT_API = ">=1.4,<2"  # plugins.stash came in 1.4
NOT_SCALARS = {"step", "epoch", "split"}


class TensorBoardOptions(Options):
    log_dir: str | None = Field(None, description="where the event files go (default: RUN_DIR/tensorboard)")


#: This run's event writer, in its ``plugins.stash`` (a process may train several runs).
WRITER = StashKey[Any]()


@hookimpl
def plait_config_schema():
    return TensorBoardOptions


@hookimpl
def plait_fit_start(state):
    if not state.is_main:
        return
    from torch.utils.tensorboard import SummaryWriter

    log_dir = state.config.options(TensorBoardOptions).log_dir or Path(state.run_dir) / "tensorboard"
    state.plugins.stash[WRITER] = SummaryWriter(log_dir=str(log_dir))


@hookimpl
def plait_log_metrics(metrics, step, state):
    writer = state.plugins.stash.get(WRITER)
    if writer is None:
        return
    for name, value in metrics.items():
        if name not in NOT_SCALARS and isinstance(value, Number):
            writer.add_scalar(f"{metrics.get('split', 'train')}/{name}", value, step)


@hookimpl
def plait_fit_end(state):
    writer = state.plugins.stash.get(WRITER)
    if writer is None:
        return
    for group, values in state.metrics.get("test", {}).items():  # fused, and each modality alone
        for name, value in values.items():
            if isinstance(value, Number):
                writer.add_scalar(f"test/{group}/{name}", value, state.step)
    writer.close()
