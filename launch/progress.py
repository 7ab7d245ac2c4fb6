"""The driver's one progress bar for a Ray Train run: rank 0 sends its progress through a Ray
queue (``ProgressForwarder``, a runner plugin), the driver draws it (``show_progress``); the
workers' own output stays in their logs unless ``--verbose``."""
from __future__ import annotations

import threading
import time
from typing import Any

from plait.core.hookspecs import hookimpl
from plait.core.parallel import COMPILING, compiled_after

__all__ = ["ProgressForwarder", "send_nowait", "show_progress"]


def send_nowait(queue: Any, event: dict) -> None:
    try:
        queue.put_nowait(event)
    except Exception:  # noqa: BLE001 - a full or gone queue must never stop training
        pass


class ProgressForwarder:
    """Registered on rank 0: sends progress to the driver, which draws the one progress bar
    (workers' own output stays in their logs unless --verbose).

    Each send is a round trip to the queue actor, so steps are sent at most every
    ``interval_s`` (a bar needs no more, and on a busy CPU every round trip slows rank 0 and,
    through DDP's sync, every rank)."""

    def __init__(self, queue: Any, interval_s: float = 1.0) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.last_sent = 0.0
        self.compiling_since: float | None = None  # run.compile: until the first step ends

    def _send(self, event: dict) -> None:
        self.last_sent = time.monotonic()
        send_nowait(self.queue, event)

    @hookimpl
    def plait_fit_start(self, state) -> None:
        self._send({"total": state.total_steps, "step": state.step, "name": state.config.run.name})
        if state.config.run.compile:
            self._send({"note": COMPILING})
            self.compiling_since = time.perf_counter()

    @hookimpl
    def plait_batch_end(self, state) -> None:
        if self.compiling_since is not None:
            self._send({"note": compiled_after(time.perf_counter() - self.compiling_since)})
            self.compiling_since = None
        if time.monotonic() - self.last_sent >= self.interval_s or state.step == state.total_steps:
            self._send({"step": state.step})

    @hookimpl
    def plait_log_metrics(self, metrics) -> None:
        self._send({"metrics": metrics})


def show_progress(queue: Any, running: threading.Thread, workers: dict[int, dict[str, Any]]) -> None:
    """Draw rank 0's progress on the driver until the training thread ends; note in ``workers``
    where each rank logs."""
    from queue import Empty

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} samples/s"),
                        TimeElapsedColumn(), console=Console(stderr=True),
                        refresh_per_second=1)  # events come once a second; redraws take CPU from the workers
    task = None
    with progress:
        while running.is_alive() or not queue.empty():
            try:
                event = queue.get(timeout=1.0)  # a long poll: few round trips
            except (Empty, Exception):  # noqa: BLE001 - the queue actor goes away with Ray
                continue
            if "worker" in event:
                workers[event["worker"]["rank"]] = event["worker"]
            elif "note" in event:
                progress.console.print(event["note"])
            elif "total" in event:
                task = progress.add_task(event["name"], total=event["total"], completed=event["step"],
                                         loss="-", speed="-")
            elif task is None:
                continue
            elif "step" in event:
                progress.update(task, completed=event["step"])
            elif event["metrics"].get("split") == "train":
                row = event["metrics"]
                progress.update(task, completed=row["step"], loss=f"{row['loss']:.3f}",
                                speed=f"{row['samples_per_s']:.0f}")
            elif event["metrics"].get("split") == "val":
                row = event["metrics"]
                progress.console.print(f"epoch {row['epoch'] + 1}: val accuracy {row['accuracy']:.4f}, "
                                       f"val loss {row['loss']:.4f}")
