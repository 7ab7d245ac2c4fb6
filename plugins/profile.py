"""``torch.profiler`` over a few training steps, so a slow step (or a slow plugin) can be seen.

    plugins:
      ...
      profile: {start_step: 5, steps: 3}     # ranks: all to profile every worker

It writes ``RUN_DIR/profile/``: ``trace_rank<R>.json`` (Chrome trace: open it in Perfetto,
ui.perfetto.dev, or chrome://tracing), ``top_ops_rank<R>.txt`` (operators by self time) and,
on CUDA, ``memory_rank<R>.pickle`` (a memory snapshot for pytorch.org/memory_viz). While it
records, every plugin's hook call is a named range ``<plugin>.<hook>`` in the trace.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from plait.core.config import Options
from plait.core.files import replaced_atomically, write_text_atomic
from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

log = logging.getLogger("plait")


class ProfileOptions(Options):
    start_step: int = Field(5, ge=0, description="the optimizer step the recording starts at (its first steps "
                            "build caches and kernels; skip them)")
    steps: int = Field(3, ge=1, description="how many optimizer steps are recorded")
    ranks: Literal["main", "all"] = Field("main", description="main: rank 0 only; all: every worker, each its "
                                          "own files")
    record_shapes: bool = Field(False, description="record each operator's input shapes (a larger trace)")
    memory: bool = Field(True, description="CUDA: record the allocator's history and write a memory snapshot")
    top: int = Field(30, ge=1, description="rows of the top-operators table")


@dataclass
class _Recording:
    profiler: torch.profiler.profile | None  # None once stopped
    stop_at: int  # state.step after the last recorded step
    memory: bool
    step_range: Any = None  # the open ``record_function`` of the step being recorded


RECORDING = StashKey[_Recording]()


@hookimpl
def plait_config_schema():
    return ProfileOptions


@hookimpl(tryfirst=True)  # before the other plugins' batch_start, so that theirs is recorded too
def plait_batch_start(state):
    recording = state.plugins.stash.get(RECORDING)
    if recording is not None and recording.profiler is not None:
        _open_step(state, recording)
        return
    options = state.config.options(ProfileOptions)
    if state.step != options.start_step or recording is not None:
        return
    if options.ranks == "main" and not state.is_main:
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = state.device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    memory = cuda and options.memory
    if memory:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    profiler = torch.profiler.profile(activities=activities, record_shapes=options.record_shapes,
                                      profile_memory=cuda, with_stack=False)
    profiler.__enter__()
    recording = state.plugins.stash[RECORDING] = _Recording(profiler, options.start_step + options.steps, memory)
    state.plugins.profiled = True
    _open_step(state, recording)
    log.info("profile: recording steps %d to %d (rank %d)", options.start_step + 1, options.start_step + options.steps,
             state.rank)


@hookimpl(trylast=True)  # after the other plugins' batch_end
def plait_batch_end(state):
    recording = state.plugins.stash.get(RECORDING)
    if recording is None or recording.profiler is None:
        return
    _close_step(recording)
    if state.step >= recording.stop_at:
        _stop(state, recording)


@hookimpl
def plait_fit_end(state):
    recording = state.plugins.stash.get(RECORDING)
    if recording is not None and recording.profiler is not None:  # the run ended before the last step
        _stop(state, recording)


def _open_step(state: Any, recording: _Recording) -> None:
    """A named range ``plait step N`` around each recorded optimizer step (a skipped step's is closed here)."""
    _close_step(recording)
    recording.step_range = torch.profiler.record_function(f"plait step {state.step + 1}")
    recording.step_range.__enter__()


def _close_step(recording: _Recording) -> None:
    if recording.step_range is not None:
        recording.step_range.__exit__(None, None, None)
        recording.step_range = None


def _stop(state: Any, recording: _Recording) -> None:
    """Stop recording and write the trace, the table and (CUDA) the memory snapshot, each atomically."""
    profiler = recording.profiler
    assert profiler is not None
    _close_step(recording)
    state.plugins.profiled = False
    profiler.__exit__(None, None, None)
    recording.profiler = None  # done: batch_end and fit_end find nothing to stop
    folder = state.run_dir / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    rank = state.rank
    trace = folder / f"trace_rank{rank}.json"
    with replaced_atomically(trace) as partial:
        profiler.export_chrome_trace(str(partial))
    options = state.config.options(ProfileOptions)
    sort = "self_cuda_time_total" if state.device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=options.top)
    write_text_atomic(folder / f"top_ops_rank{rank}.txt", table + "\n")
    if recording.memory:
        snapshot = folder / f"memory_rank{rank}.pickle"
        with replaced_atomically(snapshot) as partial:
            torch.cuda.memory._dump_snapshot(str(partial))
        torch.cuda.memory._record_memory_history(enabled=None)
    log.info("profile: %s (open in ui.perfetto.dev) and %s", trace, folder / f"top_ops_rank{rank}.txt")
