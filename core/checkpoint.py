"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder ``checkpoints/step-00000123/`` with ``model.safetensors``,
``trainer.safetensors`` (optimizer and plugin tensors) and ``state.json``. A sharded one
(``run.checkpoint_format: sharded``) holds ``shards/`` instead of ``model.safetensors`` and the
optimizer: torch.distributed.checkpoint's files, one per worker. Either is written into a
temporary folder and renamed into place, so a folder with that name is complete. Nothing is
unpickled when loading the full format; DCP's ``.metadata`` is a pickle, so a sharded
checkpoint is one to trust as code.

A model whose plain module has ``plait_rebuilt_weights`` (a set of names) is saved without those: the
plugin that sets it rebuilds them exactly from the config (``lora``'s frozen base, read again from its
pretrained folder, its digest checked on resume), so a checkpoint holds what training changed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .distributed import barrier, sync_buffers, unwrap
from .errors import DataError, PlaitError

__all__ = ["PREFIX", "SHARDS", "CheckpointError", "export", "latest", "list_checkpoints", "load", "model_weights",
           "packed", "rebuilt_weights", "regroup", "save", "save_sharded", "weights_digest", "what_is_kept"]


class CheckpointError(PlaitError):
    """A checkpoint could not be written."""


PREFIX = "step-"
#: The folder of a sharded checkpoint that torch.distributed.checkpoint writes, each worker its own files.
SHARDS = "shards"
TMP_PREFIX = ".tmp-"
TENSOR_KEY = "__tensor__"
INT_KEYS = "__int_keys__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Copy of ``obj`` with every tensor moved into ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_KEY: path}
    if isinstance(obj, dict):
        flat = {str(k): flatten(v, tensors, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if obj and all(isinstance(k, int) for k in obj):  # optimizer state is keyed by parameter index
            return {INT_KEYS: flat}
        return flat
    if isinstance(obj, (list, tuple)):
        return [flatten(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
    return obj


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten``."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_KEY}:
            return tensors[obj[TENSOR_KEY]]
        if set(obj) == {INT_KEYS}:
            return {int(k): unflatten(v, tensors) for k, v in obj[INT_KEYS].items()}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def packed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies on the CPU: safetensors refuses views, shared storage (tied weights are stored
    twice) and other strides (a statically quantized convolution's weight can come out channels-last)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in weights.items()}


def rebuilt_weights(model: torch.nn.Module) -> frozenset[str]:
    """The names of the weights checkpoints leave out (see the module docstring)."""
    names: frozenset[str] = getattr(unwrap(model), "plait_rebuilt_weights", frozenset())
    return names


def _saved(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    rebuilt = rebuilt_weights(model)
    return {name: value for name, value in weights.items() if name not in rebuilt}


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights of ``model`` (plain, DDP or FSDP) on the CPU, under the
    plain module's names, but for ``rebuilt_weights``. Collective under FSDP: every worker calls it;
    only rank 0 gets them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: value for name, value in _saved(model, weights).items() if isinstance(value, torch.Tensor)}


def save(checkpoints_dir: Path, step: int, weights: dict[str, torch.Tensor], trainer_state: dict[str, Any],
         keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep``; return its folder.

    A write that fails (disk full, read-only folder, quota) raises ``CheckpointError`` and leaves
    the checkpoints already there as they were."""
    final = checkpoints_dir / f"{PREFIX}{step:08d}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _start_writing(checkpoints_dir, tmp)
        save_file(packed(weights), str(tmp / "model.safetensors"))
        _finish_writing(checkpoints_dir, tmp, final, trainer_state)
    except (OSError, SafetensorError) as exc:  # safetensors reports its I/O errors as its own type
        raise _not_written(checkpoints_dir, tmp, final, exc) from None
    _prune(checkpoints_dir, keep)
    return final


def _start_writing(checkpoints_dir: Path, tmp: Path) -> None:
    """An empty temporary folder for a checkpoint, and none left by a process killed while writing."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _finish_writing(checkpoints_dir: Path, tmp: Path, final: Path, trainer_state: dict[str, Any]) -> None:
    """Add the trainer state to ``tmp``, flush its files and rename it to ``final``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(trainer_state, tensors)
    save_file(tensors, str(tmp / "trainer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton, indent=1))
    for file in tmp.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # the same step written again (a resumed run): swap, then drop the old one
        replaced = checkpoints_dir / f"{TMP_PREFIX}replaced-{final.name}"
        os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(checkpoints_dir)


def _not_written(checkpoints_dir: Path, tmp: Path, final: Path, exc: Exception) -> CheckpointError:
    """The one-line error of a failed write (disk full, read-only folder, quota), its leftovers removed."""
    shutil.rmtree(tmp, ignore_errors=True)
    reason = getattr(exc, "strerror", None) or exc
    return CheckpointError(f"{checkpoints_dir}: cannot write checkpoint {final.name}: {reason}; "
                           f"{what_is_kept(checkpoints_dir, 'is intact')}")


def _prune(checkpoints_dir: Path, keep: int) -> None:
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded(checkpoints_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """A checkpoint whose model and optimizer state each worker writes itself, with
    ``torch.distributed.checkpoint`` (collective: every worker calls it). Nothing is gathered on rank
    0, which writes only the small trainer state beside the shards. Atomic as ``save`` is: all of it
    goes into a temporary folder that rank 0 renames into place once every worker has finished
    (DCP writes its ``.metadata`` last)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = checkpoints_dir / f"{PREFIX}{step:08d}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}{final.name}-sharded"  # one name that every worker knows
    if is_main:
        _start_writing(checkpoints_dir, tmp)
    barrier()
    sync_buffers(model)  # buffers are not sharded: every worker saves rank 0's, as the full format keeps them
    states = {"model": _saved(model, get_model_state_dict(model)),
              "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(_contiguous(states), checkpoint_id=str(tmp / SHARDS))
    if is_main:
        try:
            _finish_writing(checkpoints_dir, tmp, final, trainer_state)
        except (OSError, SafetensorError) as exc:
            raise _not_written(checkpoints_dir, tmp, final, exc) from None
        _prune(checkpoints_dir, keep)
    barrier()
    return final


def _load_shards(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The model (and optimizer) state of a sharded checkpoint, resharded onto however many workers
    load it: DCP reads each tensor's pieces by name and offset."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    shards = checkpoint / SHARDS
    if not (shards / ".metadata").is_file():
        raise DataError(f"{checkpoint}: the sharded checkpoint is incomplete (no {SHARDS}/.metadata)")
    states: dict[str, Any] = {"model": _saved(model, get_model_state_dict(model))}
    if optimizer is not None:
        states["optimizer"] = get_optimizer_state_dict(model, optimizer)
    written = _contiguous(states)
    try:
        dcp.load(written, checkpoint_id=str(shards))
    except (dcp.api.CheckpointException, OSError, RuntimeError, ValueError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DataError(f"{checkpoint}: the sharded checkpoint cannot be read ({first[:200]})") from None
    states = _as_before(written, states)
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=not rebuilt_weights(model)))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, regroup(states["optimizer"], model, optimizer))


def _strided(tensor: Any) -> bool:
    return any(type(p).__name__ == "_StridedShard" for p in getattr(tensor, "placements", ()))


def _contiguous(tree: Any) -> Any:
    """``tree`` with each strided DTensor (tensor parallelism's packed q/k/v rows, ``HeadParallel``) as the plain
    shard of the same dimension: DCP writes each worker's piece as one block at an offset, which a strided
    piece is not. Collective: the rows move between the workers."""
    from torch.distributed.tensor import Shard

    if _strided(tree):
        placements = [Shard(p.dim) if type(p).__name__ == "_StridedShard" else p for p in tree.placements]
        return tree.redistribute(tree.device_mesh, placements)
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_contiguous(v) for v in tree]
    return tree


def _as_before(loaded: Any, template: Any) -> Any:
    """``loaded`` (read into ``_contiguous(template)``) laid out as ``template`` again."""
    if _strided(template):
        return loaded.redistribute(template.device_mesh, template.placements)
    if isinstance(template, dict) and isinstance(loaded, dict):
        return {k: _as_before(loaded[k], v) if k in loaded else v for k, v in template.items()}
    if isinstance(template, list) and isinstance(loaded, list) and len(loaded) == len(template):
        return [_as_before(a, b) for a, b in zip(loaded, template, strict=True)]
    return loaded


def regroup(saved: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict (keyed by parameter name) with its parameter groups laid out as ``optimizer``'s.
    A run resumed on another mesh splits its groups otherwise (split and whole parameters, see ``core.optim``);
    each group takes the settings (its learning rate where the schedule left it) of the saved group of its
    ``name``, or of the first saved group in a checkpoint whose groups have no names."""
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    saved_settings = [{k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]]
    by_name = {settings.get("name"): settings for settings in saved_settings}

    def settings_for(group: dict[str, Any]) -> dict[str, Any]:
        return by_name.get(group.get("name"), saved_settings[0])

    return {**saved, "param_groups": [{**settings_for(group), "params": [names[id(p)] for p in group["params"]]}
                                      for group in optimizer.param_groups]}


def export(checkpoint: Path, model: torch.nn.Module) -> Path:
    """Write ``model.safetensors`` into a sharded checkpoint: the weights of ``model``, a plain model of the
    run that ``load`` filled from those shards (``plait.core.runs.load_run`` does), which is what ``plait
    eval``, ``compress`` and distillation read."""
    target = checkpoint / "model.safetensors"
    tmp = checkpoint / f"{TMP_PREFIX}model-{os.getpid()}.safetensors"
    save_file(packed(_saved(model, model.state_dict())), str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors (names, dtypes, shapes and values, in name order): the same for the same
    weights wherever they were loaded or saved."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def what_is_kept(checkpoints_dir: Path, state: str) -> str:
    """For an error that stops a run: "the newest checkpoint, step-N, <state>", or that there is none."""
    newest = latest(checkpoints_dir)
    return f"the newest checkpoint, {newest.name}, {state}" if newest else "no checkpoint was written yet"


def load(checkpoint: Path, model: torch.nn.Module, device: torch.device | str = "cpu",
         optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights into ``model`` (plain, DDP or FSDP: under FSDP every worker calls it and
    keeps its shard) and return the trainer state saved beside them. A sharded checkpoint loads
    ``optimizer`` too (its trainer state then says ``"optimizer": None``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a resume reads the shards (they hold the optimizer); eval reads what `plait export` wrote, if it did
    if (checkpoint / SHARDS).is_dir() and (optimizer is not None or not (checkpoint / "model.safetensors").is_file()):
        _load_shards(checkpoint, model, optimizer)
        return {**_read_trainer_state(checkpoint), "optimizer": None}
    try:
        weights = load_file(str(checkpoint / "model.safetensors"), device=str(device))
    except (OSError, ValueError) as exc:
        raise DataError(f"{checkpoint}: unreadable checkpoint: {exc}") from None
    trainer = _read_trainer_state(checkpoint)
    misfit = (f"{checkpoint}: the saved weights do not fit the model built from the config ({{}}); a changed "
              "model needs a new run.name")
    try:
        missing, unexpected = set_model_state_dict(
            model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=False))
    except RuntimeError as exc:  # shapes differ
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise DataError(misfit.format("; ".join(details[:3]))) from None
    missing = set(missing) - rebuilt_weights(model)
    if missing or unexpected:
        raise DataError(misfit.format(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"))
    return trainer


def _read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """What ``_finish_writing`` wrote beside the weights."""
    try:
        tensors = load_file(str(checkpoint / "trainer.safetensors"), device="cpu")
        skeleton = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{checkpoint}: unreadable checkpoint: {exc}") from None
    trainer: dict[str, Any] = unflatten(skeleton, tensors)
    return trainer
