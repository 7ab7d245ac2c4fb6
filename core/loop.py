"""The training run: ``fit``. It knows nothing of Ray: the same ``fit`` runs in-process or inside
a Ray Train worker, which passes its rank and its ``prepare_*`` functions in ``Distributed``.

Where each hook fires is drawn in ``hookspecs``' module docstring; a test traces a real run
against that drawing. The pieces live beside this module: ``data`` (data sets, loaders),
``step`` (one optimizer step), ``evaluation``, ``resume`` (checkpoints' trainer state) and
``distributed`` (collectives).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import checkpoint, hookspecs
from .config import PlaitConfig
from .data import (
    LoaderBatches,
    MixedDataset,
    ShardSampler,
    TrainBatches,
    TransformedDataset,
    build_dataset,
    epoch_sampler,
    make_loader,
    move,
    source_shares,
)
from .distributed import (
    Distributed,
    all_gather,
    all_reduce_sum,
    peak_memory_mb,
    pick_device,
    seed_everything,
    unwrap,
)
from .errors import ConfigError, DataError
from .evaluation import evaluate, evaluate_by_modality
from .files import write_json_atomic, write_text_atomic
from .manager import Plugins
from .model import build_model
from .optim import apply_freezing, build_optimizer, schedule
from .parallel import checkpoint_activations, compile_blocks
from .resume import forget_rows_after, init_from, restore, save_checkpoint
from .runs import RUN_INFO, run_dir_for
from .state import RunState
from .step import MicroBatch, autocast, densify_gradients, grad_norm, loss_terms, skip_nonfinite, train_row
from .throughput import EnergyMeter, Peak, count_flops, device_peak, efficiency, energy_figures

__all__ = ["fit", "log_metrics"]

log = logging.getLogger("plait")


@dataclass
class _Training:
    """What the loop holds besides the run state: loaders, and the tensors a skipped step restores."""

    train: TrainBatches
    train_set: TransformedDataset
    evaluation: dict[str, DataLoader[dict[str, Any]]]
    buffers: list[torch.Tensor]  # what a forward may change (BatchNorm statistics and counts)
    sparse_params: list[torch.nn.Parameter]  # embeddings whose gradients arrive sparse
    reduce_gradients: Callable[[torch.nn.Module], None]  # Distributed.reduce_gradients
    frozen: list[torch.nn.Module] = field(default_factory=list)  # kept in eval mode: their statistics too stay
    peak: Peak = field(default_factory=lambda: Peak(None, "not measured"))  # this worker's device
    peak_tflops: float | None = None  # every worker's together: what MFU divides by
    flops_per_sample: float | None = None  # counted on one training batch of this process
    batches_run: int = 0  # training batches this process has run


def fit(config: PlaitConfig, plugins: Plugins, dist: Distributed | None = None) -> RunState:
    """Train ``config`` with ``plugins`` and evaluate on the test split.

    Running a run name whose folder holds a checkpoint continues from that checkpoint,
    exactly where it stopped (mid-epoch included).
    """
    state, training, skip = _start(config, plugins, dist or Distributed())
    plugins.call_each(hookspecs.plait_fit_start, state=state)
    training.buffers = list(state.model.buffers())
    meter = EnergyMeter(state.device)
    energy_at_start = all_gather(meter.read())
    started, samples_seen = time.perf_counter(), 0
    while state.epoch < config.run.epochs and state.step < state.total_steps:
        plugins.call_each(hookspecs.plait_epoch_start, state=state)
        samples, batches_done = _train_epoch(state, training, skip)
        samples_seen, skip = samples_seen + samples, 0
        if "val" in training.evaluation:
            state.metrics["val"] = evaluate(state, training.evaluation["val"], split="val")
            log_metrics(state, {"split": "val", **state.metrics["val"]})
        plugins.call_each(hookspecs.plait_epoch_end, state=state)
        save_checkpoint(state, batches_done)
        state.epoch += 1
    _finish(state, training, time.perf_counter() - started, samples_seen)
    seen = state.metrics["run"]["samples"]
    state.metrics["run"].update(energy_figures(meter, energy_at_start, all_gather(meter.read()), seen))
    if state.is_main:
        write_json_atomic(state.run_dir / "metrics.json", state.metrics["run"])
    plugins.call_each(hookspecs.plait_fit_end, state=state)
    return state


def _start(config: PlaitConfig, plugins: Plugins, dist: Distributed) -> tuple[RunState, _Training, int]:
    """The run state, its loaders and (resuming) how many batches of the epoch are done."""
    run = config.run
    seed_everything(run.seed + dist.data_rank)  # one tensor-parallel group draws the same dropout and shuffles
    device = dist.device or pick_device(run.device)
    if run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"{config.source}: run.precision: fp16 needs a GPU; use bf16 on the CPU")
    run_dir = run_dir_for(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = {split: build_dataset(plugins, config, split) for split in ("train", "val", "test")}
    train_set = splits.pop("train")
    assert train_set is not None  # build_dataset raises for a missing train split
    seed_everything(run.seed)  # the same initial weights on every worker
    model = build_model(plugins, config, train_set.modalities, len(train_set.classes)).to(device)
    newest = checkpoint.latest(run_dir / "checkpoints")
    if run.init_from and newest is None:
        init_from(Path(run.init_from), model, device)
    claims = apply_freezing(plugins, config, model)
    model = dist.parallelize(model)
    recomputed = checkpoint_activations(model, run.activation_checkpointing, run.activation_checkpointing_every)
    if recomputed:
        log.info("activation checkpointing: %d blocks recomputed in the backward pass", len(recomputed))
    if run.compile:
        compiled = compile_blocks(model, device)
        log.info("run.compile: %d blocks compiled with torch.compile; the first step traces and builds them "
                 "(expect it to take a while)", len(compiled))
    model = dist.prepare_model(model)
    seed_everything(run.seed + dist.data_rank)
    training = _loaders(config, dist, model, train_set, splits)
    training.frozen = [claim.group.module for claim in claims if claim.group.freeze]
    training.peak = device_peak(device, run.precision, run.peak_tflops)
    peaks = all_gather(training.peak.tflops)
    training.peak_tflops = None if None in peaks else sum(peaks)
    state = _run_state(config, plugins, dist, device, model, build_optimizer(model, claims, run), train_set,
                       len(training.train))
    skip = 0
    if newest is not None:
        skip = restore(state, checkpoint.load(newest, model, device, state.optimizer))
        if state.is_main:
            forget_rows_after(run_dir / "metrics.jsonl", state.step)
    if state.is_main:
        write_text_atomic(run_dir / "config.yaml", config.to_yaml())
        info = {"classes": state.classes, "modalities": list(state.modalities), "data": train_set.info}
        write_json_atomic(run_dir / RUN_INFO, info)
    return state, training, skip


def _loaders(config: PlaitConfig, dist: Distributed, model: torch.nn.Module, train_set: TransformedDataset,
             evaluation: dict[str, TransformedDataset | None]) -> _Training:
    run = config.run
    train: TrainBatches
    if dist.train_batches is not None:
        train = dist.train_batches(train_set)
    else:  # a mixture reads in its own order, already one per data replica; other sets get the runner's sampler
        mixture = isinstance(train_set.base, MixedDataset)
        sampler = epoch_sampler(train_set, run.seed, dist.data_rank, dist.data_world_size) if mixture else None
        train = LoaderBatches(dist.prepare_loader(make_loader(train_set, run.batch_size, not mixture, run.seed,
                                                              run.loader_workers, sampler), not mixture), run.seed)
    loaders = {split: dist.prepare_loader(make_loader(ds, run.eval_batch_size, False, run.seed, run.loader_workers,
                                                      ShardSampler(len(ds), dist.data_rank, dist.data_world_size)),
                                     False)
               for split, ds in evaluation.items() if ds is not None}
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse
              and isinstance(m.weight, torch.nn.Parameter)]
    return _Training(train=train, train_set=train_set, evaluation=loaders, buffers=[], sparse_params=sparse,
                     reduce_gradients=dist.reduce_gradients)


def _run_state(config: PlaitConfig, plugins: Plugins, dist: Distributed, device: torch.device,
               model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_set: TransformedDataset,
               batches_per_epoch: int) -> RunState:
    run = config.run
    steps_per_epoch = math.ceil(batches_per_epoch / run.grad_accumulation)
    total_steps = int(min(run.max_steps or math.inf, run.epochs * steps_per_epoch))
    scheduler = schedule(optimizer, run, total_steps)
    encoders = getattr(unwrap(model), "encoders", None)  # a plugin may replace the model wholesale
    return RunState(
        config=config, plugins=plugins, run_dir=run_dir_for(config), device=device, classes=list(train_set.classes),
        modalities=tuple(encoders) if encoders is not None else train_set.modalities,
        model=model, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch, rank=dist.rank,
        world_size=dist.world_size, lockstep=dist.lockstep, tensor_parallel=dist.tensor_parallel,
        scaler=torch.amp.GradScaler("cuda") if run.precision == "fp16" else None,
    )


def _train_epoch(state: RunState, training: _Training, skip: int) -> tuple[int, int]:
    """Train the rest of ``state.epoch``; return (samples stepped on, batches of the epoch done)."""
    run, plugins = state.config.run, state.plugins
    state.model.train()
    for frozen in training.frozen:  # no batch-norm statistics move, no dropout: a fixed feature extractor
        frozen.eval()
    window_start, window_samples, samples = time.perf_counter(), 0, 0
    batches_done = skip
    micro: list[MicroBatch] = []  # the batches of the current optimizer step
    saved_buffers: list[torch.Tensor] = []
    shares = source_shares(training.train_set, run.seed, state.epoch) if not skip else None
    if shares is not None:  # a mixture: what the epoch draws of each source
        log_metrics(state, {"split": "sources", **shares})
    for loaded in _one_ahead(state, training.train.epoch(state.epoch, skip)):
        batch = move(loaded, state.device)
        batches_done += 1
        last_of_step = len(micro) + 1 == run.grad_accumulation or batches_done == state.batches_per_epoch
        if not micro:
            plugins.call_each(hookspecs.plait_batch_start, state=state, batch=batch)
            saved_buffers = [b.detach().clone() for b in training.buffers]
        training.batches_run += 1
        if training.flops_per_sample is None and training.batches_run > int(run.compile):
            # once, on a real batch; under run.compile the second, as the first compiles (and a compiled
            # region runs eagerly while the counter watches, so it must not be the one that compiles)
            flops, (outputs, loss) = count_flops(_forward_backward, state, batch, micro, sync=last_of_step)
            training.flops_per_sample = flops / micro[-1].samples
        else:
            outputs, loss = _forward_backward(state, batch, micro, sync=last_of_step)
        if not last_of_step:
            continue
        stepped = _optimizer_step(state, training, micro, saved_buffers)
        if stepped:
            size = sum(m.samples for m in micro)
            samples, window_samples = samples + size, window_samples + size
            plugins.call_each(hookspecs.plait_batch_end, state=state, batch=batch, outputs=outputs, loss=loss)
            if state.step % run.log_every == 0:
                now = time.perf_counter()
                row = train_row(state, micro, window_samples, now - window_start)
                state.metrics["train"] = {**row, **efficiency(training.flops_per_sample, row["samples_per_s"],
                                                                      training.peak_tflops)}
                window_start, window_samples = now, 0
                log_metrics(state, {"split": "train", **state.metrics["train"]})
        micro = []
        if not stepped:
            continue
        if run.checkpoint_every and state.step % run.checkpoint_every == 0 and batches_done < state.batches_per_epoch:
            save_checkpoint(state, batches_done)
        if state.step >= state.total_steps:
            break
    return samples, batches_done


def _one_ahead(state: RunState, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches``, each yielded once the one after it is loaded and shown to ``plait_batch_loaded``,
    so that a plugin's work on a batch runs while the batch before it trains. Without an
    implementer, ``batches`` as they come."""
    if not state.plugins.implementers(hookspecs.plait_batch_loaded):
        yield from batches
        return
    waiting: dict[str, Any] | None = None
    for loaded in batches:
        state.plugins.call_each(hookspecs.plait_batch_loaded, state=state, batch=loaded)
        if waiting is not None:
            yield waiting
        waiting = loaded
    if waiting is not None:
        yield waiting


def _forward_backward(state: RunState, batch: dict[str, Any], micro: list[MicroBatch],
                      sync: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """One micro-batch's forward and backward (gradients summed into ``.grad``; DDP all-reduces
    them only when ``sync``, on a step's last micro-batch); appends it to ``micro``."""
    model = state.model
    ddp_no_sync = getattr(model, "no_sync", None)
    no_sync = ddp_no_sync() if not sync and callable(ddp_no_sync) else contextlib.nullcontext()
    with no_sync:
        with autocast(state):
            outputs = model(batch)
            terms = loss_terms(state, batch, outputs)
            loss = torch.stack([t.float() for t in terms.values()]).sum()
        scaled = loss / state.config.run.grad_accumulation
        torch.autograd.backward(state.scaler.scale(scaled) if state.scaler is not None else scaled)
    micro.append(MicroBatch(batch["label"].shape[0], loss.detach(), {k: v.detach() for k, v in terms.items()}))
    return outputs, loss


def _optimizer_step(state: RunState, training: _Training, micro: list[MicroBatch],
                    saved_buffers: list[torch.Tensor]) -> bool:
    """Clip and step, or skip a non-finite step (see ``step.skip_nonfinite``); True if it stepped."""
    optimizer, scheduler = state.optimizer, state.scheduler
    assert optimizer is not None and scheduler is not None
    training.reduce_gradients(state.model)
    densify_gradients(training.sparse_params)
    if state.scaler is not None:
        state.scaler.unscale_(optimizer)
    state.plugins.call_each(hookspecs.plait_after_backward, state=state)
    norm = grad_norm(state.model, state.config.run.grad_clip)
    if skip_nonfinite(state, micro, norm, training.buffers, saved_buffers):
        return False
    if state.scaler is not None:
        state.scaler.step(optimizer)
        state.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state.step += 1
    return True


def _finish(state: RunState, training: _Training, train_seconds: float, samples_seen: int) -> None:
    """Test metrics by modality, and the run's figures in ``state.metrics["run"]`` (``fit`` adds energy
    and writes them to metrics.json)."""
    seen = int(all_reduce_sum([samples_seen])[0]) // state.tensor_parallel  # a TP group's samples count once
    speed = seen / max(train_seconds, 1e-9)
    results: dict[str, Any] = {"world_size": state.world_size, "steps": state.step, "samples": seen,
                               "train_seconds": round(train_seconds, 2), "samples_per_s": round(speed, 1)}
    if "tokens_per_s" in state.metrics.get("train", {}):
        results["tokens_per_s"] = state.metrics["train"]["tokens_per_s"]  # the last logged window's
    counted = all_gather(training.flops_per_sample)[0]  # rank 0's count, so that every worker reports one figure
    results["flops_per_sample"] = None if counted is None else round(counted)
    results["flops_counted"] = (f"a forward and backward of the {'second' if state.config.run.compile else 'first'} "
                                "training batch (FlopCounterMode)"
                                + ("; includes the recomputed forward of activation checkpointing"
                                   if state.config.run.activation_checkpointing != "none" else ""))
    results.update(efficiency(counted, speed, training.peak_tflops) or {"achieved_tflops": None, "mfu": None})
    results["peak_tflops"] = training.peak_tflops
    results["peak_tflops_source"] = training.peak.source
    if state.device.type == "cuda":
        results["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(state.device) / 2**20, 1)
    results["peak_memory_mb"] = all_gather(peak_memory_mb(state.device))  # one entry per worker, by rank
    if "val" in state.metrics:
        results["val"] = state.metrics["val"]
    if "test" in training.evaluation:
        state.metrics["test"] = results["test"] = evaluate_by_modality(state, training.evaluation["test"])
    state.metrics["run"] = results


def log_metrics(state: RunState, metrics: dict[str, Any]) -> None:
    """Append a row to ``metrics.jsonl`` and hand it to the logger plugins (main process only)."""
    if not state.is_main:
        return
    row = {"step": state.step, "epoch": state.epoch, **metrics}
    path = state.run_dir / "metrics.jsonl"
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    except OSError as exc:  # a full disk, say: the run cannot go on keeping its record
        kept = checkpoint.what_is_kept(state.run_dir / "checkpoints", "is intact")
        raise DataError(f"{path}: cannot write the metrics: {exc.strerror or exc}; {kept}") from None
    state.plugins.call_each(hookspecs.plait_log_metrics, metrics=row, step=state.step, state=state)
