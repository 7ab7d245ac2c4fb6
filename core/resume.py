"""Exact resume: what a checkpoint holds besides the weights (optimizer, schedule, scaler, every
worker's random streams, the plugins' state, where in the epoch it was) and how it comes back."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, hookspecs
from .distributed import all_gather
from .errors import ConfigError
from .files import write_text_atomic
from .state import RunState

__all__ = ["forget_rows_after", "init_from", "restore", "save_checkpoint", "trainer_state"]


def trainer_state(state: RunState, batches_done: int, optimizer: bool = True) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs (collective: all workers call it).

    The optimizer state is keyed by parameter name and unsharded, so a checkpoint resumes
    alike in one process, under DDP or under FSDP; a sharded checkpoint keeps it in its shards
    (``optimizer=False``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    assert state.optimizer is not None and state.scheduler is not None
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batches_done": batches_done,
        "data_world_size": state.data_world_size,  # a resume on another number of replicas keeps its place
        "optimizer": get_optimizer_state_dict(state.model, state.optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if optimizer else None,
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "rng": all_gather(_rng_state()),  # one per worker: each draws its own dropout and augmentation
        "plugins": {name: data for name, data in
                    state.plugins.call_each(hookspecs.plait_state_dict, state=state).items() if data is not None},
    }


def save_checkpoint(state: RunState, batches_done: int) -> None:
    """Write a checkpoint of the run as it is (collective; rank 0 writes the full format, every
    worker its shards in the sharded one), then tell the plugins."""
    run = state.config.run
    if run.checkpoint_format == "sharded":
        assert state.optimizer is not None
        trainer = trainer_state(state, batches_done, optimizer=False)
        path = checkpoint.save_sharded(state.run_dir / "checkpoints", state.step, state.model, state.optimizer,
                                       trainer, run.keep_checkpoints, state.is_main)
    else:
        weights, trainer = checkpoint.model_weights(state.model), trainer_state(state, batches_done)
        if not state.is_main:
            return
        path = checkpoint.save(state.run_dir / "checkpoints", state.step, weights, trainer, run.keep_checkpoints)
    if state.is_main:
        state.plugins.call_each(hookspecs.plait_checkpoint_saved, state=state, path=path)


def restore(state: RunState, saved: dict[str, Any]) -> int:
    """Load the trainer state; return how many batches of ``state.epoch`` are already done."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    assert state.optimizer is not None and state.scheduler is not None
    # strict=False: a parameter that never had a gradient (an unused modality's temperature) has
    # no optimizer state in the checkpoint, exactly as in the run that wrote it
    if saved["optimizer"] is not None:  # None: a sharded checkpoint, whose load restored it
        set_optimizer_state_dict(state.model, state.optimizer,
                                 checkpoint.regroup(saved["optimizer"], state.model, state.optimizer),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    state.scheduler.load_state_dict(saved["scheduler"])
    # per group, as this run's groups are laid out (another mesh groups split and whole parameters otherwise)
    state.scheduler.base_lrs = [group["initial_lr"] for group in state.optimizer.param_groups]
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    batches_done = epoch_position(state, int(saved["batches_done"]), int(saved.get("data_world_size",
                                                                                   state.data_world_size)))
    if batches_done >= state.batches_per_epoch:  # saved at the end of the epoch
        state.epoch, batches_done = state.epoch + 1, 0
    rng = saved["rng"]
    _set_rng_state(rng[state.rank] if len(rng) == state.world_size else rng[0])
    for name, data in saved.get("plugins", {}).items():
        state.plugins.call_one(name, hookspecs.plait_load_state_dict, state=state, data=data)
    return batches_done


def epoch_position(state: RunState, batches_done: int, saved_replicas: int) -> int:
    """The batches of the epoch each replica has done, for this run's replicas, from ``batches_done`` of
    each of ``saved_replicas``. The replicas read one shuffled order in turn (replica r takes positions r,
    r + n, ...), so the samples done are its first ``batches_done * batch_size * saved_replicas``, and a
    resume on another number of replicas goes on from the same sample."""
    if saved_replicas == state.data_world_size:
        return batches_done
    batch = state.config.run.batch_size
    samples = batches_done * batch * saved_replicas
    if samples >= state.batches_per_epoch * batch * state.data_world_size:  # saved at the end of the epoch
        return state.batches_per_epoch
    if samples % (batch * state.data_world_size):
        raise ConfigError(f"cannot resume {samples} samples into the epoch on {state.data_world_size} data "
                          f"replica(s) of {batch}: the position falls inside a batch")
    return samples // (batch * state.data_world_size)


def forget_rows_after(path: Path, step: int) -> None:
    """Drop the metric rows a stopped run logged after the checkpoint it resumes from: the
    resumed run logs those steps again, and each step must have one row."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))


def init_from(folder: Path, model: torch.nn.Module, device: torch.device) -> None:
    """Start from another run's newest weights (the optimizer starts fresh)."""
    newest = checkpoint.latest(folder / "checkpoints")
    if newest is None:
        raise ConfigError(f"run.init_from: {folder} is not a run folder with a checkpoint")
    checkpoint.load(newest, model, device)


def _rng_state() -> dict[str, Any]:
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)
    _, keys, pos, has_gauss, cached = legacy
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate((3, tuple(int(x) for x in saved["python"]), None))
    np_state = saved["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
