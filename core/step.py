"""One optimizer step's mechanics: the loss terms plugins return, mixed precision, gradient
accumulation's micro-batches, the guard against non-finite steps, the LR schedule and the
training row a step logs."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from . import checkpoint, hookspecs
from .distributed import all_gather, all_reduce_max, all_reduce_sum, peak_memory_mb
from .errors import PlaitError, PluginError
from .parallel import local_tensor
from .state import RunState

__all__ = ["MicroBatch", "NonFiniteLoss", "autocast", "densify_gradients", "grad_norm", "loss_terms", "lr_factor",
           "skip_nonfinite", "train_row"]

log = logging.getLogger("plait")


@dataclass(frozen=True)
class MicroBatch:
    """What one batch of an optimizer step left for the step's row: with gradient accumulation
    a step has several."""

    samples: int
    loss: torch.Tensor  # detached
    terms: dict[str, torch.Tensor]  # detached, by name


class NonFiniteLoss(PlaitError):
    """Too many optimizer steps had a NaN or Inf loss or gradient."""


def loss_terms(state: RunState, batch: dict[str, Any], outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every plugin's named loss terms for this batch; a name two plugins return is an error."""
    terms: dict[str, torch.Tensor] = {}
    returned = state.plugins.call_each(hookspecs.plait_loss_terms, state=state, batch=batch, outputs=outputs)
    for plugin, result in returned.items():
        for name, value in (result or {}).items():
            if name in terms:
                raise PluginError(f"plugin '{plugin}' returned loss term '{name}', which another plugin returned too")
            terms[name] = value
            state.loss_owners[name] = plugin
    if not terms:
        raise PluginError("no plugin returned a loss term; add 'fusion' (cross-entropy) to plugins:")
    return terms


def autocast(state: RunState) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for ``run.precision`` (bf16 or fp16); nothing for fp32."""
    precision = state.config.run.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=state.device.type, dtype=dtype)


def grad_norm(model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """The gradients' total norm, after clipping them to ``clip`` when given."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    meshes = {getattr(g, "device_mesh", None) for g in grads}
    if len(meshes) > 1:  # split and whole weights together (tensor or expert parallelism without FSDP)
        return _mixed_grad_norm(grads, clip)
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    full: torch.Tensor = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    return full


def _mixed_grad_norm(grads: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The total norm of gradients some of which are DTensors split over a mesh (a tensor- or expert-parallel
    weight's) and some whole on every worker (identical there): each split one's squares are summed over the
    mesh dimensions it is split on, each whole one counts once. One all-reduce per group of dimensions."""
    squares: dict[tuple[Any, ...], torch.Tensor] = {}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for grad in cast(list[Any], grads):
        local = local_tensor(grad)
        split = tuple(i for i, p in enumerate(getattr(grad, "placements", ())) if not p.is_replicate())
        key = (grad.device_mesh, *split) if split else ()
        squares[key] = squares.get(key, torch.zeros((), dtype=torch.float64)) + local.double().pow(2).sum()
        if split:
            groups[key] = [grad.device_mesh.get_group(i) for i in split]
    total = torch.zeros((), dtype=torch.float64)
    for key, value in squares.items():
        for group in groups.get(key, []):
            torch.distributed.all_reduce(value, group=group)
        total = total + value
    norm = total.sqrt().float()
    if clip and float(norm) > clip:
        scale = clip / (float(norm) + 1e-6)
        for grad in grads:
            local_tensor(grad).mul_(scale)
    return norm


def skip_nonfinite(state: RunState, micro: list[MicroBatch], norm: torch.Tensor,
                   buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    """True when this step must not reach the optimizer: a loss term, or (without fp16's scaler,
    which skips such steps itself) the gradient norm is not finite. The step's gradients are
    dropped and buffers that its forward passes changed (BatchNorm statistics) are put back.
    Every worker decides alike: gradients are averaged first, and a worker's bad loss is shared."""
    bad_terms = sorted({name for batch in micro for name, value in batch.terms.items()
                        if not torch.isfinite(value).all()})
    bad_grad = state.scaler is None and not bool(torch.isfinite(norm))
    if not all_reduce_max([float(bool(bad_terms) or bad_grad)])[0]:
        return False
    assert state.optimizer is not None
    state.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
    state.nonfinite_steps += 1
    run = state.config.run
    what = ", ".join(f"loss term '{n}' (plugin {state.loss_owners.get(n, '?')})" for n in bad_terms) or \
        ("the gradients" if bad_grad else "another worker's loss")
    message = (f"step {state.step + 1}: {what} not finite; the step was skipped, the weights are unchanged "
               f"({state.nonfinite_steps} skipped, run.max_nonfinite_steps {run.max_nonfinite_steps})")
    if state.nonfinite_steps > run.max_nonfinite_steps:
        kept = checkpoint.what_is_kept(state.run_dir / "checkpoints", "is the last good one")
        raise NonFiniteLoss(f"{message}; the run stops: {kept}")
    if state.is_main:
        log.warning(message)
    return True


def densify_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sparse gradients (cheap to all-reduce) become dense before clipping and the optimizer,
    which then apply exactly the update they would to a dense gradient (AdamW decays every row)."""
    for param in params:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.to_dense()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then constant or a cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_row(state: RunState, micro: list[MicroBatch], window_samples: int, window_s: float) -> dict[str, Any]:
    """The training row of this step, averaged over the workers (collective).

    A loss term may be missing from one worker's batches (no pair for a contrastive loss): the
    workers agree on the names first, then average each over the workers and batches that had it.
    Plugins' ``plait_train_metrics`` count once per worker. Samples and the tokens plugins count
    (``plait_count_tokens``) are summed into rates; each worker's peak memory is listed by rank."""
    sums: dict[str, tuple[float, int]] = {}
    for name in {n for batch in micro for n in batch.terms}:
        had = [batch.terms[name].item() for batch in micro if name in batch.terms]
        sums[name] = (sum(had), len(had))
    for extra in state.plugins.call_each(hookspecs.plait_train_metrics, state=state).values():
        sums.update({n: (float(v), 1) for n, v in (extra or {}).items()})
    counted = [n for n in state.plugins.call_each(hookspecs.plait_count_tokens, state=state).values() if n is not None]
    gathered = all_gather((sorted(sums), bool(counted), peak_memory_mb(state.device)))
    names = sorted(set().union(*(worker[0] for worker in gathered)))
    local = [sum(batch.loss.item() for batch in micro) / len(micro), float(window_samples), float(sum(counted))]
    for name in names:
        local += sums.get(name, (0.0, 0))
    loss_sum, samples, tokens, *totals = all_reduce_sum(local)
    averaged = {name: total / max(1.0, count) for name, total, count in zip(names, totals[0::2], totals[1::2],
                                                                                strict=True)}
    assert state.scheduler is not None
    row: dict[str, Any] = {"loss": loss_sum / state.world_size, **averaged,
                           "lr": float(state.scheduler.get_last_lr()[0]),
                           "samples_per_s": samples / state.tensor_parallel / max(window_s, 1e-9)}
    if any(worker[1] for worker in gathered):
        row["tokens_per_s"] = tokens / state.tensor_parallel / max(window_s, 1e-9)
    row["peak_memory_mb"] = [worker[2] for worker in gathered]
    return row
