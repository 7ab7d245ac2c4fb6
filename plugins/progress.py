"""Console progress: one rich progress bar with loss and samples/s, and a line per epoch
with the validation metrics. Main process only."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from plait.core.hookspecs import hookimpl

_bar: dict = {}


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
    _bar.update(progress=progress, task=task)


@hookimpl
def plait_batch_end(state):
    if "progress" in _bar:
        _bar["progress"].update(_bar["task"], completed=state.step)


@hookimpl
def plait_log_metrics(metrics):
    if "progress" not in _bar:
        return
    progress = _bar["progress"]
    if metrics.get("split") == "train":
        progress.update(_bar["task"], loss=f"{metrics['loss']:.3f}", speed=f"{metrics['samples_per_s']:.0f}")
    elif metrics.get("split") == "val":
        progress.console.print(
            f"epoch {metrics['epoch'] + 1}: val accuracy {metrics['accuracy']:.4f}, val loss {metrics['loss']:.4f}"
        )


@hookimpl
def plait_fit_end(state):
    progress = _bar.pop("progress", None)
    if progress is not None:
        progress.stop()
    _bar.clear()
