"""The run state: what every training and evaluation hook sees."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import PlaitConfig
    from .manager import Plugins


@dataclass
class RunState:
    config: PlaitConfig
    plugins: Plugins
    run_dir: Path
    device: torch.device
    classes: list[str] = field(default_factory=list)
    modalities: tuple[str, ...] = ()
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0  # optimizer steps
    batches_per_epoch: int = 0  # batches of this worker (several per step with gradient accumulation)
    scaler: Any = None  # torch.amp.GradScaler for fp16
    #: Latest metrics by group: {"train": {...}, "val": {...}, "test": {...}}.
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    lockstep: bool = False  # see core.loop.Distributed.lockstep

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0
