"""A test plugin: fails once on rank 1 at a given step (the marker file remembers it did), by
raising or, with ``how: abort``, by aborting its process as a native crash does."""
import os
from pathlib import Path
from typing import Literal

from plait.core.config import Options
from plait.core.hookspecs import hookimpl


class FailOnceOptions(Options):
    marker: str
    at_step: int = 5
    how: Literal["raise", "abort"] = "raise"


@hookimpl
def plait_config_schema():
    return FailOnceOptions


@hookimpl
def plait_batch_start(state, batch):
    options = state.config.options(FailOnceOptions)
    marker = Path(options.marker)
    if state.rank == 1 and state.step == options.at_step and not marker.exists():
        marker.write_text("failed once")
        if options.how == "abort":
            os.abort()  # SIGABRT: what glibc does when it finds the heap corrupted
        raise RuntimeError(f"injected failure at step {state.step}")
