"""The train/eval loop. It knows nothing of Ray: the same ``fit`` runs in-process or inside
a Ray Train worker, which passes its rank and its ``prepare_*`` functions in ``Distributed``.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import checkpoint
from .config import PlaitConfig
from .errors import ConfigError, DataError, PlaitError, PluginError
from .manager import Plugins
from .model import build_model
from .state import RunState

log = logging.getLogger("plait")

RUN_INFO = "run.json"


def _identity(obj: Any) -> Any:
    return obj


def _same_loader(loader: DataLoader, add_dist_sampler: bool) -> DataLoader:
    return loader


@dataclass
class Distributed:
    """How a distributed runner plugs into ``fit``; the defaults are one process.

    ``prepare_loader(loader, add_dist_sampler)`` may swap the sampler for a distributed one
    (training); evaluation loaders come already sharded and ask for no sampler.
    Collectives go through ``torch.distributed`` when a process group is initialised.
    """

    rank: int = 0
    world_size: int = 1
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    prepare_loader: Callable[[DataLoader, bool], DataLoader] = _same_loader
    device: torch.device | None = None
    #: Every forward is a collective (FSDP gathers each unit's weights): evaluation then runs
    #: the same number of batches on every worker, repeating its last batch where it has fewer.
    lockstep: bool = False


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all workers (identity in one process)."""
    return _all_reduce(values, "sum")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maxima over all workers (identity in one process)."""
    return _all_reduce(values, "max")


def _all_reduce(values: list[float], op: str) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    ops = torch.distributed.ReduceOp
    torch.distributed.all_reduce(tensor, op=ops.SUM if op == "sum" else ops.MAX)
    return tensor.tolist()


def all_gather(obj: Any) -> list[Any]:
    """``obj`` from every worker, by rank."""
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def sync_buffers(model: torch.nn.Module) -> None:
    """Every worker's buffers (batch-norm statistics) become rank 0's, which are the ones a
    checkpoint keeps (nothing in one process)."""
    if not _distributed():
        return
    buffers = [b for b in model.buffers() if b.numel()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every worker
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        torch.distributed.broadcast(flat, src=0)
        for buffer, value in zip(same, flat.split([b.numel() for b in same])):
            buffer.copy_(value.view_as(buffer))


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: an exact partition (no padding, unlike
    DistributedSampler), so that metrics summed over workers count each sample once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(torch.utils.data.Sampler):
    """The indices of ``sampler`` after the first ``skip``: resume in the middle of an epoch
    without loading the samples already trained on."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class TransformedDataset(Dataset):
    """A data set whose samples pass through the plugins' sample transforms."""

    def __init__(self, base: Any, transforms: list[Callable[[dict], dict]]) -> None:
        self.base = base
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        for transform in self.transforms:
            sample = transform(sample)
        return sample


def build_dataset(plugins: Plugins, config: PlaitConfig, split: str) -> Any:
    """The ``split`` data set with its transforms, or None when no plugin has that split."""
    dataset = plugins.first("plait_build_dataset", config=config, split=split)
    if dataset is None:
        if split == "train":
            raise PluginError("no plugin provides a data set; add one (spoken_digits, manifest) to plugins:")
        return None
    for attribute in ("classes", "modalities", "collate_fn"):
        if not hasattr(dataset, attribute):
            raise PluginError(f"the {split} data set {type(dataset).__name__} has no '{attribute}' attribute")
    if len(dataset) == 0:
        raise DataError(f"the {split} split of {type(dataset).__name__} is empty")
    transforms = [t for result in plugins.call_each("plait_sample_transforms", config=config, split=split).values()
                  for t in (result or [])]
    wrapped = TransformedDataset(dataset, transforms)
    wrapped.classes, wrapped.modalities, wrapped.collate_fn = dataset.classes, dataset.modalities, dataset.collate_fn
    wrapped.info = getattr(dataset, "info", {})
    return wrapped


def make_loader(dataset: Any, batch_size: int, shuffle: bool, seed: int, workers: int,
                sampler: Any = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        collate_fn=dataset.collate_fn, num_workers=workers, generator=generator, persistent_workers=workers > 0,
    )


def move(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


def only_modalities(batch: dict, keep: set[str]) -> dict:
    """``batch`` as if its samples had only the modalities in ``keep``."""
    present = {m: (mask if m in keep else torch.zeros_like(mask)) for m, mask in batch["present"].items()}
    return {**batch, "present": present}


def loss_terms(state: RunState, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
    terms: dict[str, torch.Tensor] = {}
    for plugin, result in state.plugins.call_each("plait_loss_terms", state=state, batch=batch, outputs=outputs).items():
        for name, value in (result or {}).items():
            if name in terms:
                raise PluginError(f"plugin '{plugin}' returned loss term '{name}', which another plugin returned too")
            terms[name] = value
            state.loss_owners[name] = plugin
    if not terms:
        raise PluginError("no plugin returned a loss term; add 'fusion' (cross-entropy) to plugins:")
    return terms


class NonFiniteLoss(PlaitError):
    """Too many optimizer steps had a NaN or Inf loss or gradient."""


def _grad_norm(model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """The gradients' total norm, after clipping them to ``clip`` when given."""
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


def skip_nonfinite(state: RunState, micro: list, grad_norm: torch.Tensor,
                   buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    """True when this step must not reach the optimizer: a loss term, or (without fp16's scaler,
    which skips such steps itself) the gradient norm is not finite. The step's gradients are
    dropped and buffers that its forward passes changed (BatchNorm statistics) are put back.
    Every worker decides alike: gradients are averaged first, and a worker's bad loss is shared."""
    bad_terms = sorted({name for _, _, terms in micro for name, value in terms.items()
                        if not torch.isfinite(value).all()})
    bad_grad = state.scaler is None and not bool(torch.isfinite(grad_norm))
    if not all_reduce_max([float(bool(bad_terms) or bad_grad)])[0]:
        return False
    state.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
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
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(state: RunState, loader: DataLoader, keep: set[str] | None = None) -> dict[str, float]:
    """Accuracy and loss of ``state.model`` on ``loader``, optionally with only ``keep`` modalities."""
    model = state.model if state.lockstep else _unwrap(state.model)  # DDP's forward needs no collectives
    # DDP broadcasts rank 0's buffers at the start of each training forward, so after the last one
    # each worker's batch-norm statistics hold its own batch: evaluate the model the checkpoint keeps
    sync_buffers(model)
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
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
        state.plugins.call_each("plait_eval_batch", state=state, batch=batch, outputs=outputs)
    model.train(was_training)
    correct, total, loss_sum = all_reduce_sum([correct, total, loss_sum])
    total = int(total)
    # samples: what was scored (positions, for a sequence task)
    metrics = {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "samples": total}
    for extra in state.plugins.call_each("plait_eval_metrics", state=state, metrics=dict(metrics)).values():
        metrics.update(extra or {})
    return metrics


def evaluate_by_modality(state: RunState, loader: DataLoader) -> dict[str, dict[str, float]]:
    """Metrics for all modalities together ("fused") and for each modality alone."""
    results = {"fused": evaluate(state, loader)}
    for modality in state.modalities:
        results[modality] = evaluate(state, loader, keep={modality})
    return results


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
    state.plugins.call_each("plait_log_metrics", metrics=row, step=state.step, state=state)


def autocast(state: RunState) -> contextlib.AbstractContextManager:
    """Mixed precision for ``run.precision`` (bf16 or fp16); nothing for fp32."""
    precision = state.config.run.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=state.device.type, dtype=dtype)


def _trainer_state(state: RunState, batches_done: int) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs (collective: all workers call it).

    The optimizer state is keyed by parameter name and unsharded, so a checkpoint resumes
    alike in one process, under DDP or under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return {
        "step": state.step,
        "epoch": state.epoch,
        "batches_done": batches_done,
        "optimizer": get_optimizer_state_dict(state.model, state.optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "rng": all_gather(_rng_state()),  # one per worker: each draws its own dropout and augmentation
        "plugins": {k: v for k, v in state.plugins.call_each("plait_state_dict", state=state).items() if v is not None},
    }


def _restore(state: RunState, saved: dict[str, Any]) -> int:
    """Load the trainer state; return how many batches of ``state.epoch`` are already done."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (an unused modality's temperature) has
    # no optimizer state in the checkpoint, exactly as in the run that wrote it
    set_optimizer_state_dict(state.model, state.optimizer, saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.step, state.epoch = int(saved["step"]), int(saved["epoch"])
    batches_done = int(saved["batches_done"])
    if batches_done >= state.batches_per_epoch:  # saved at the end of the epoch
        state.epoch, batches_done = state.epoch + 1, 0
    rng = saved["rng"]
    _set_rng_state(rng[state.rank] if len(rng) == state.world_size else rng[0])
    for name, data in saved.get("plugins", {}).items():
        state.plugins.call_one(name, "plait_load_state_dict", state=state, data=data)
    return batches_done


def _forget_rows_after(path: Path, step: int) -> None:
    """Drop the metric rows a stopped run logged after the checkpoint it resumes from: the
    resumed run logs those steps again, and each step must have one row."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        _write_text_atomic(path, "".join(kept))


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate((3, tuple(int(x) for x in saved["python"]), None))
    np_state = saved["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))


def _init_from(folder: Path, model: torch.nn.Module, device: torch.device) -> None:
    """Start from another run's newest weights (the optimizer starts fresh)."""
    newest = checkpoint.latest(folder / "checkpoints")
    if newest is None:
        raise ConfigError(f"run.init_from: {folder} is not a run folder with a checkpoint")
    checkpoint.load(newest, model, device)


def run_dir_for(config: PlaitConfig) -> Path:
    return Path(config.run.runs_dir) / config.run.name


def _epoch_loader(loader: DataLoader, epoch: int, seed: int, skip_batches: int) -> DataLoader:
    """The training loader positioned for ``epoch``: its shuffle depends only on the seed
    and the epoch, and ``skip_batches`` already trained on are passed over."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed + epoch)
    if not skip_batches:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=SkipSampler(sampler, skip_batches *
                      loader.batch_size), collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator)  # the loader draws its worker seed from it: same RNG use


def _check_precision(config: PlaitConfig, device: torch.device) -> None:
    if config.run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"{config.source}: run.precision: fp16 needs a GPU; use bf16 on the CPU")


def fit(config: PlaitConfig, plugins: Plugins, dist: Distributed | None = None) -> RunState:
    """Train ``config`` with ``plugins`` and evaluate on the test split.

    Running a run name whose folder holds a checkpoint continues from that checkpoint,
    exactly where it stopped (mid-epoch included).
    """
    dist = dist or Distributed()
    run = config.run
    seed_everything(run.seed + dist.rank)
    device = dist.device or pick_device(run.device)
    _check_precision(config, device)
    run_dir = run_dir_for(config)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_set = build_dataset(plugins, config, "train")
    val_set = build_dataset(plugins, config, "val")
    test_set = build_dataset(plugins, config, "test")
    modalities = tuple(train_set.modalities)
    seed_everything(run.seed)  # the same initial weights on every worker
    model = build_model(plugins, config, modalities, len(train_set.classes)).to(device)
    newest = checkpoint.latest(run_dir / "checkpoints")
    if run.init_from and newest is None:
        _init_from(Path(run.init_from), model, device)
    model = dist.prepare_model(model)
    seed_everything(run.seed + dist.rank)

    train_loader = dist.prepare_loader(
        make_loader(train_set, run.batch_size, True, run.seed, run.loader_workers), True)
    eval_loaders = {
        split: dist.prepare_loader(make_loader(ds, run.eval_batch_size, False, run.seed, run.loader_workers,
                                               ShardSampler(len(ds), dist.rank, dist.world_size)), False)
        for split, ds in (("val", val_set), ("test", test_set)) if ds is not None
    }
    batches_per_epoch = len(train_loader)
    sparse_params = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    accumulation = run.grad_accumulation
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = int(min(run.max_steps or math.inf, run.epochs * steps_per_epoch))
    # fused: one kernel for all parameters (the per-tensor loop costs ~25 ms a step on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, run.warmup_steps, total_steps, run.schedule)
    )
    encoders = getattr(_unwrap(model), "encoders", None)  # a plugin may replace the model wholesale
    state = RunState(
        config=config, plugins=plugins, run_dir=run_dir, device=device, classes=list(train_set.classes),
        modalities=tuple(encoders) if encoders is not None else modalities,
        model=model, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, batches_per_epoch=batches_per_epoch, rank=dist.rank,
        world_size=dist.world_size, lockstep=dist.lockstep,
        scaler=torch.amp.GradScaler("cuda") if run.precision == "fp16" else None,
    )
    skip = 0
    if newest is not None:
        skip = _restore(state, checkpoint.load(newest, model, device))
        if state.is_main:
            _forget_rows_after(run_dir / "metrics.jsonl", state.step)
    if state.is_main:
        (run_dir / "config.yaml").write_text(config.to_yaml())
        info = {"classes": state.classes, "modalities": list(state.modalities), "data": train_set.info}
        (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1))

    def save_checkpoint(batches_done: int) -> None:
        weights, trainer_state = checkpoint.model_weights(model), _trainer_state(state, batches_done)
        if state.is_main:
            path = checkpoint.save(run_dir / "checkpoints", state.step, weights, trainer_state, run.keep_checkpoints)
            plugins.call_each("plait_checkpoint_saved", state=state, path=path)

    plugins.call_each("plait_fit_start", state=state)
    buffers = list(model.buffers())  # what a forward may change (BatchNorm statistics and counts)
    started = time.perf_counter()
    samples_seen = 0
    while state.epoch < run.epochs and state.step < total_steps:
        plugins.call_each("plait_epoch_start", state=state)
        model.train()
        window_start, window_samples = time.perf_counter(), 0
        batches_done = skip
        # (samples, loss, loss terms) of each batch of the current optimizer step
        micro: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
        for batch in _epoch_loader(train_loader, state.epoch, run.seed, skip):
            batch = move(batch, device)
            batches_done += 1
            last_of_step = len(micro) + 1 == accumulation or batches_done == batches_per_epoch
            if not micro:
                plugins.call_each("plait_batch_start", state=state, batch=batch)
                saved_buffers = [b.detach().clone() for b in buffers]
            sync = contextlib.nullcontext() if last_of_step or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(state):
                    outputs = model(batch)
                    terms = loss_terms(state, batch, outputs)
                    loss = torch.stack([t.float() for t in terms.values()]).sum()
                scaled = loss / accumulation
                (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
            micro.append((batch["label"].shape[0], loss.detach(), {k: v.detach() for k, v in terms.items()}))
            if not last_of_step:
                continue
            densify_gradients(sparse_params)
            if state.scaler is not None:
                state.scaler.unscale_(optimizer)
            plugins.call_each("plait_after_backward", state=state)
            grad_norm = _grad_norm(model, run.grad_clip)
            if skip_nonfinite(state, micro, grad_norm, buffers, saved_buffers):
                micro = []
                continue
            if state.scaler is not None:
                state.scaler.step(optimizer)
                state.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            size = sum(m[0] for m in micro)
            samples_seen += size
            window_samples += size
            plugins.call_each("plait_batch_end", state=state, batch=batch, outputs=outputs, loss=loss)
            if state.step % run.log_every == 0:
                now = time.perf_counter()
                # (sum, count) of each loss term and plugin metric on this worker. A term may be
                # missing from one worker's batches (no pair for a contrastive loss): agree on the
                # names first, then average each over the workers and batches that had it.
                values = {n: (sum(m[2][n].item() for m in micro if n in m[2]), sum(n in m[2] for m in micro))
                          for n in {n for m in micro for n in m[2]}}
                for extra in plugins.call_each("plait_train_metrics", state=state).values():
                    values.update({n: (float(v), 1) for n, v in (extra or {}).items()})
                names = sorted(set().union(*all_gather(sorted(values))))
                local = [sum(m[1].item() for m in micro) / len(micro), window_samples]
                for name in names:
                    local += values.get(name, (0.0, 0))
                loss_sum, samples, *sums = all_reduce_sum(local)
                state.metrics["train"] = {
                    "loss": loss_sum / state.world_size,
                    **{name: sums[2 * i] / max(1.0, sums[2 * i + 1]) for i, name in enumerate(names)},
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": samples / max(now - window_start, 1e-9),
                }
                window_start, window_samples = now, 0
                log_metrics(state, {"split": "train", **state.metrics["train"]})
            micro = []
            if run.checkpoint_every and state.step % run.checkpoint_every == 0 and batches_done < batches_per_epoch:
                save_checkpoint(batches_done)
            if state.step >= total_steps:
                break
        skip = 0
        if "val" in eval_loaders:
            state.metrics["val"] = evaluate(state, eval_loaders["val"])
            log_metrics(state, {"split": "val", **state.metrics["val"]})
        plugins.call_each("plait_epoch_end", state=state)
        save_checkpoint(batches_done)
        state.epoch += 1
    train_seconds = time.perf_counter() - started

    samples_seen = int(all_reduce_sum([samples_seen])[0])
    results: dict[str, Any] = {"world_size": state.world_size, "steps": state.step,
                               "train_seconds": round(train_seconds, 2),
                               "samples_per_s": round(samples_seen / max(train_seconds, 1e-9), 1)}
    if device.type == "cuda":
        results["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if "val" in state.metrics:
        results["val"] = state.metrics["val"]
    if "test" in eval_loaders:
        state.metrics["test"] = results["test"] = evaluate_by_modality(state, eval_loaders["test"])
    state.metrics["run"] = results
    if state.is_main:
        _write_json_atomic(run_dir / "metrics.json", results)
    plugins.call_each("plait_fit_end", state=state)
    return state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside a DDP/FSDP wrapper (checkpoints hold the plain weights)."""
    return getattr(model, "module", model)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1))
