"""A plugin for ``benchmarks/memory.py``: what each worker's memory holds, measured in the worker.

Per optimizer step it records the resident set (Linux's VmRSS) at the step's start, its peak
(VmHWM, reset at each step's start through /proc/self/clear_refs) over the forward and backward
and over the whole step, and the bytes of the worker's own parameters, gradients and optimizer
state, counted from the tensors (a sharded parameter's local shard). Each worker writes
``memory-probe-<rank>.json`` in the run folder at the end.

The benchmark runs the workers with a fixed malloc mmap threshold, so a large tensor's memory
goes back to the system when the tensor is freed and the resident set follows the live tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

PAGE = 1024  # /proc/self/status reports kB


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * PAGE
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return int(local.numel() * local.element_size())


def _state_bytes(state: Any) -> dict[str, int]:
    params = list(state.model.parameters())
    optimizer = [v for s in state.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_local_bytes(t) for t in optimizer)}


RECORD = StashKey[dict[str, Any]]()
_before_model: dict[str, int] = {}


@hookimpl(tryfirst=True)
def plait_build_model(config, modalities, num_classes):
    """Only observes (returns None, so the task's plugin builds the model): the resident set before any
    weight exists, with the imports done and the data sets loaded."""
    _before_model["rss"] = _status("VmRSS")


@hookimpl
def plait_fit_start(state):
    ddp = isinstance(state.model, torch.nn.parallel.DistributedDataParallel)
    state.plugins.stash[RECORD] = {"rank": state.rank, "rss_before_model": _before_model.get("rss"),
                                   "gradients_are_bucket_views": ddp, "steps": []}


@hookimpl
def plait_batch_start(state, batch):
    _reset_peak()
    state.plugins.stash[RECORD]["steps"].append({"step": state.step + 1, "rss_start": _status("VmRSS")})


@hookimpl
def plait_after_backward(state):
    row = state.plugins.stash[RECORD]["steps"][-1]
    row["peak_forward_backward"] = _status("VmHWM")
    row.update(_state_bytes(state))


@hookimpl
def plait_batch_end(state, batch, outputs, loss):
    state.plugins.stash[RECORD]["steps"][-1]["peak_step"] = _status("VmHWM")


@hookimpl
def plait_fit_end(state):
    record = state.plugins.stash[RECORD]
    path = Path(state.run_dir) / f"memory-probe-{state.rank}.json"
    path.write_text(json.dumps(record))
