"""The run state: what every training and evaluation hook sees, and what compression shares."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .distributed import DataReplicas

if TYPE_CHECKING:
    from .config import PlaitConfig
    from .manager import Plugins


__all__ = ["CompressJob", "RunState"]


@dataclass(kw_only=True)
class RunState(DataReplicas):
    """One run as the hooks see it. ``optimizer`` and ``scheduler`` exist while ``fit`` trains;
    a run folder loaded for evaluation or compression has neither."""

    config: PlaitConfig
    plugins: Plugins
    run_dir: Path
    device: torch.device
    model: torch.nn.Module  # as trained: wrapped by DDP or sharded by FSDP (``distributed.unwrap``)
    classes: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ()
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0  # optimizer steps
    batches_per_epoch: int = 0  # batches of this worker (several per step with gradient accumulation)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    #: Latest metrics by group: {"train": {...}, "val": {...}, "test": {...}}.
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    lockstep: bool = False  # see core.distributed.Distributed.lockstep
    #: Workers per tensor-parallel group: they see the same batches, so sums of counts over all workers
    #: count each sample this many times (``DataReplicas``).
    tensor_parallel: int = 1
    #: Which plugin returned each loss term (for messages).
    loss_owners: dict[str, str] = field(default_factory=dict)
    #: Optimizer steps skipped because a loss or gradient was not finite.
    nonfinite_steps: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0


@dataclass
class CompressJob:
    """What ``plait_compress`` hooks share while ``plait compress`` turns one run into a smaller one.

    ``config``/``raw`` describe the model being compressed: what rebuilds it from the new run folder.
    A step that changes how it is built (quantized layers, a distilled student) records that with
    ``set_plugin_options`` or ``replace_config``, so the folder it writes loads back as it is.
    """

    config: PlaitConfig
    raw: dict[str, Any]
    source: RunState  # the run being compressed, its model as trained
    source_dir: Path
    out_dir: Path
    #: ``calibration_batches(n)``: up to ``n`` validation batches of 32, on the model's device.
    calibration_batches: Callable[[int], list[dict[str, Any]]]
    #: ``resolve(raw)`` -> (config, plugins): validates a changed raw config (set by plait compress).
    resolve: Callable[[dict[str, Any]], tuple[PlaitConfig, Plugins]]
    #: Lines for report.md: what each step did.
    notes: list[str] = field(default_factory=list)

    def set_plugin_options(self, plugin: str, options: dict[str, Any]) -> None:
        """Write ``plugin``'s block of the new run folder's config (and re-validate it)."""
        self.replace_config({**self.raw, "plugins": {**self.raw["plugins"], plugin: options}})

    def replace_config(self, raw: dict[str, Any]) -> None:
        """The model is now built by ``raw`` (a distilled student's config, say)."""
        self.config, _ = self.resolve(raw)
        self.raw = raw
