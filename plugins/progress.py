"""Console progress: one rich progress bar with loss and samples/s, and a line per epoch
with the validation metrics. Main process only."""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from plait.core.hookspecs import hookimpl
from plait.core.parallel import COMPILING, compiled_after
from plait.core.stash import StashKey


@dataclass
class _Bar:
    progress: Progress
    task: TaskID
    compiling_since: float | None = None  # run.compile: until the first step ends


#: This run's bar (in the run's stash; main process only).
BAR = StashKey[_Bar]()


@hookimpl
def plait_fit_start(state):
    if not state.is_main:
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    task = progress.add_task(state.config.run.name, total=state.total_steps, completed=state.step, loss="-", speed="-")
    progress.start()
    bar = state.plugins.stash[BAR] = _Bar(progress, task)
    if state.config.run.compile:
        progress.console.print(COMPILING)
        bar.compiling_since = time.perf_counter()


@hookimpl
def plait_batch_end(state):
    bar = state.plugins.stash.get(BAR)
    if bar is None:
        return
    bar.progress.update(bar.task, completed=state.step)
    if bar.compiling_since is not None:
        bar.progress.console.print(compiled_after(time.perf_counter() - bar.compiling_since))
        bar.compiling_since = None


@hookimpl
def plait_log_metrics(metrics, state):
    bar = state.plugins.stash.get(BAR)
    if bar is None:
        return
    if metrics.get("split") == "train":
        bar.progress.update(bar.task, loss=f"{metrics['loss']:.3f}", speed=f"{metrics['samples_per_s']:.0f}")
    elif metrics.get("split") == "val":
        bar.progress.console.print(
            f"epoch {metrics['epoch'] + 1}: val accuracy {metrics['accuracy']:.4f}, val loss {metrics['loss']:.4f}"
        )


@hookimpl
def plait_fit_end(state):
    bar = state.plugins.stash.get(BAR)
    if bar is not None:
        bar.progress.stop()
