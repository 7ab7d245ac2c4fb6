"""How a model is split across workers and what it recomputes: the blocks its modules declare, FSDP2 units
made of them, and activation checkpointing.

A module built by a plugin declares its repeated blocks with a ``plait_blocks()`` method that returns some of
its submodules (a transformer's layers, a CNN's stages). The core never guesses them from class names, and a
third-party encoder takes part by defining the same method. torchtitan's ``parallelize`` functions do the same
per model: blocks first (activation checkpointing, then ``fully_shard``), the containers after, the root last.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import types
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from .config import FsdpSettings
from .errors import ConfigError, PluginError

__all__ = ["COMPILING", "DTYPES", "blocks", "checkpoint_activations", "compile_blocks", "compiled_after", "fsdp_units",
           "shard"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block the model's modules declare, as (name in ``model``, module), in the model's order."""
    names = {id(module): name for name, module in model.named_modules()}
    found: list[tuple[str, nn.Module]] = []
    for module in model.modules():
        declare = getattr(module, "plait_blocks", None)
        if not callable(declare):
            continue
        for block in declare():
            if id(block) not in names:
                raise PluginError(f"{type(module).__name__}.plait_blocks() returned a "
                                  f"{type(block).__name__} that is not one of its submodules")
            found.append((names[id(block)], block))
    return found


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _statistics_kept(block: nn.Module) -> Iterator[None]:
    """Batch norms' running statistics as they were before a recomputation: the block's second forward
    must not count its batch twice."""
    norms = [m for m in block.modules() if isinstance(m, NORMS) and m.track_running_stats]
    saved = [[cast(torch.Tensor, buffer).clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (mean, var, count) in zip(norms, saved, strict=True):
                cast(torch.Tensor, norm.running_mean).copy_(mean)
                cast(torch.Tensor, norm.running_var).copy_(var)
                cast(torch.Tensor, norm.num_batches_tracked).copy_(count)


def _has_statistics(block: nn.Module) -> bool:
    return any(isinstance(m, NORMS) and m.track_running_stats for m in block.modules())


def _recomputed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward under non-reentrant checkpointing: its activations are recomputed in the
    backward pass, with the random state of the first pass (the same dropout masks). Only a block with batch
    norms gets a context that restores their statistics: torch.compile traces checkpoint without one."""
    from torch.utils.checkpoint import checkpoint

    if _has_statistics(self):
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), _statistics_kept(self))
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module, mode: str, every: int = 2) -> list[str]:
    """Recompute the declared blocks' activations in the backward pass: every block (``full``), or every
    ``every``-th (``selective``). The blocks keep their names, so checkpoints do not change. Returns the
    names of the blocks recomputed."""
    if mode == "none":
        return []
    declared = blocks(model)
    if not declared:
        raise ConfigError(f"run.activation_checkpointing: {mode}, but no module of the model declares its blocks "
                          "(a plait_blocks() method)")
    chosen = declared if mode == "full" else declared[every - 1::every]
    for _, block in chosen:
        block.forward = types.MethodType(_recomputed_forward, block)
    return [name for name, _ in chosen]


def compile_blocks(model: nn.Module, device: torch.device) -> list[str]:
    """``torch.compile`` each declared block in place (``nn.Module.compile``: names, and so checkpoints, do
    not change), or the whole model where no module declares blocks. Compilation happens at the first step.
    On the CPU, inductor builds C++ kernels: without a C compiler that is one line, here, not a stack trace
    at the first step. Returns what was compiled."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++",
                                                                 "clang++") if c):
        raise ConfigError("run.compile: torch.compile on the CPU needs a C++ compiler (inductor builds its kernels "
                          "with one), and none of $CXX, c++, g++ or clang++ is on PATH; install one (apt install "
                          "g++) or set run.compile: false")
    declared = blocks(model) or [("", model)]
    for name, block in declared:
        if "forward" in block.__dict__ and _has_statistics(block):  # recomputed by checkpoint_activations
            raise ConfigError(f"run.compile with run.activation_checkpointing: block '{name}' has batch norms, whose "
                              "statistics a recomputation restores in a way torch.compile cannot trace; use one "
                              "of the two for this model")
        block.compile(dynamic=False)
    return [name or "the whole model" for name, _ in declared]


#: What progress output says while the first step of a ``run.compile`` run compiles, and after it.
COMPILING = "run.compile: the first step traces each block and builds its kernels; it takes longer than the rest"


def compiled_after(seconds: float) -> str:
    return f"run.compile: the first step took {seconds:.1f} s, compilation included"


def fsdp_units(model: nn.Module, units: str | list[str]) -> list[tuple[str, nn.Module]]:
    """The FSDP units below the root, innermost first (``fully_shard`` goes from the leaves up)."""
    containers = [(f"encoders.{m}", e) for m, e in getattr(model, "encoders", {}).items()]
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, nn.Module):
        containers.append(("fusion", fusion))
    if units == "modules":
        chosen = containers
    elif units == "blocks":
        chosen = blocks(model) + containers
    else:
        named = list(model.named_modules())
        chosen = []
        for pattern in units:
            matched = [(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ConfigError(f"scaling.fsdp.units: '{pattern}' matches no module of the model "
                                  f"(some of its names: {', '.join(n for n, _ in named[1:6])})")
            chosen += matched
    unique = {id(m): (n, m) for n, m in chosen}
    return sorted(unique.values(), key=lambda item: -item[0].count("."))


def shard(model: nn.Module, settings: FsdpSettings) -> list[str]:
    """FSDP2 over the default process group: each unit (see ``FsdpSettings.units``), then the root. A worker
    holds 1/world_size of each unit's weights, gradients and optimizer state and gathers one unit at a time.
    Returns the units' names."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=DTYPES[settings.param_dtype],
                                  reduce_dtype=DTYPES[settings.reduce_dtype])
    units = fsdp_units(model, settings.units)
    for _, unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    return [name for name, _ in units]
