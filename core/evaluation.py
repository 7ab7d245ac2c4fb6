"""Evaluation: accuracy and loss on a sharded loader, summed over the workers, with every
modality or only some (``plait_eval_batch`` and ``plait_eval_metrics`` fire here)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from . import hookspecs
from .data import move, only_modalities
from .distributed import all_reduce_max, all_reduce_sum, sync_buffers, unwrap
from .errors import DataError
from .state import RunState
from .step import autocast

__all__ = ["evaluate", "evaluate_by_modality"]


@torch.no_grad()
def evaluate(state: RunState, loader: DataLoader[Any], keep: set[str] | None = None,
             split: str = "test") -> dict[str, float]:
    """Accuracy and loss of ``state.model`` on ``loader`` (the ``split`` split), optionally with
    only the ``keep`` modalities."""
    model = state.model if state.lockstep else unwrap(state.model)  # DDP's forward needs no collectives
    # DDP broadcasts rank 0's buffers at the start of each training forward, so after the last one
    # each worker's batch-norm statistics hold its own batch: evaluate the model the checkpoint keeps
    sync_buffers(model)
    was_training = model.training
    model.eval()
    modalities = tuple(m for m in state.modalities if keep is None or m in keep)
    hook_args = {"state": state, "split": split, "modalities": modalities}
    correct, total, loss_sum = 0.0, 0.0, 0.0
    rounds = int(all_reduce_max([len(loader)])[0]) if state.lockstep else len(loader)
    batches, last = iter(loader), None
    for _ in range(rounds):
        loaded = next(batches, None)
        counted = loaded is not None  # past this worker's shard it only takes part in the collectives
        last = loaded if counted else last
        if last is None:
            raise DataError(f"worker {state.rank} has no evaluation batch: the split has fewer samples than workers")
        batch = move(last, state.device)
        if keep is not None:
            batch = only_modalities(batch, keep)
        with autocast(state):
            outputs = model(batch)
        if not counted:
            continue
        logits, labels = outputs["logits"].float(), batch["label"]
        if logits.dim() == 3:  # a sequence task: every position is scored (-100: not scored)
            logits, labels = logits.flatten(0, 1), labels.flatten()
        scored = labels != -100
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
        correct += (logits.argmax(-1) == labels)[scored].sum().item()
        total += int(scored.sum())
        state.plugins.call_each(hookspecs.plait_eval_batch, batch=batch, outputs=outputs, **hook_args)
    model.train(was_training)
    # a tensor-parallel group's workers score the same batches: each sample counts once per replica
    correct, total, loss_sum = (value / state.tensor_parallel for value in all_reduce_sum([correct, total, loss_sum]))
    scored_total = round(total)
    # samples: what was scored (positions, for a sequence task)
    metrics: dict[str, float] = {"accuracy": correct / max(1, scored_total), "loss": loss_sum / max(1, scored_total),
                                 "samples": scored_total}
    for extra in state.plugins.call_each(hookspecs.plait_eval_metrics, metrics=dict(metrics), **hook_args).values():
        metrics.update(extra or {})
    return metrics


def evaluate_by_modality(state: RunState, loader: DataLoader[Any], split: str = "test") -> dict[str, dict[str, float]]:
    """Metrics for all modalities together ("fused") and for each modality alone."""
    results = {"fused": evaluate(state, loader, split=split)}
    for modality in state.modalities:
        results[modality] = evaluate(state, loader, keep={modality}, split=split)
    return results
