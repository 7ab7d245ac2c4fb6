"""A plugin for benchmarks/parity.py: the time of every optimizer step's end (``STEP_ENDS``), and
the wall-clock time of the first one in $PARITY_FIRST_STEP_FILE (for time to first step)."""
import os
import time

from plait.core.hookspecs import hookimpl

STEP_ENDS: list[float] = []


@hookimpl
def plait_batch_end(state):
    STEP_ENDS.append(time.perf_counter())
    target = os.environ.get("PARITY_FIRST_STEP_FILE")
    if target and len(STEP_ENDS) == 1:
        with open(target, "w") as handle:
            handle.write(str(time.time()))
