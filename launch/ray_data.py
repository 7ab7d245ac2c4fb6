"""``data.engine: ray``: training batches through Ray Data.

Decoding (reading, resampling, resizing), the plugins' sample transforms and the collate run in Ray Data
``map_batches`` actors, CPU workers of their own (``data.cpus`` of them, all together); each training worker
reads its batches with ``ray.train.get_dataset_shard("train")`` and only trains.

Ray Data hands out rows in an order of its own when it splits a stream, so plait decides which batches each
data replica reads and Ray Data only executes that plan, in order (``preserve_order``):

- the plan is one row per batch: its replica, epoch, batch number and sample indices, from the same epoch
  orders as the DataLoader path's (``plait.core.data.epoch_sampler``: a seeded shuffle per epoch, or the
  mixture's draw), so either engine trains on the same samples in the same batches;
- Ray Train calls the plan's factory each time it starts the worker group, and the factory begins the plan
  at the newest checkpoint's place (epoch and batches done): a resumed or restarted run reads exactly the
  batches it had not trained on, with no repeat and no gap;
- each replica's plan is a dataset of its own (``train_0``, ``train_1``...; ``ReplicaDataConfig`` gives the
  workers of replica r ``train_r``), and every batch comes to the worker with its epoch and number, which the
  worker checks against the batch it expects.

Each sample is read by its index and epoch, so its random transforms draw the view the DataLoader path draws
(``plait.core.data.view_seed``): either engine, and a resumed run, trains on the same augmented samples.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plait.core import checkpoint
from plait.core.config import PlaitConfig
from plait.core.data import TransformedDataset, batches_of, build_dataset, epoch_sampler
from plait.core.errors import ConfigError, PlaitError
from plait.core.runs import prepare

DATASET = "train"


def batches_per_epoch(dataset: TransformedDataset, seed: int, replicas: int, batch_size: int) -> int:
    return math.ceil(len(epoch_sampler(dataset, seed, 0, replicas)) / batch_size)


def start_of(saved: dict[str, Any] | None, per_epoch: int, replicas: int) -> tuple[int, int]:
    """Where the plan starts: (epoch, batches of it done) of the newest checkpoint's ``state.json``. A
    checkpoint of another number of replicas starts its epoch over, and the workers pass over the batches
    they had done (``RayBatches``)."""
    if saved is None:
        return 0, 0
    epoch, done = int(saved["epoch"]), int(saved["batches_done"])
    if int(saved.get("data_world_size", replicas)) != replicas:
        return epoch, 0
    return (epoch + 1, 0) if done >= per_epoch else (epoch, done)


def newest_saved_state(runs: str, name: str, source: str) -> dict[str, Any] | None:
    """The newest checkpoint's ``state.json`` (epoch, batches done...), from a runs folder or a storage URI."""
    from plait.launch.storage import RemoteRuns, is_uri

    if is_uri(runs):
        remote = RemoteRuns(runs, source)
        newest = remote.complete_checkpoints(name)[-1:]
        return json.loads(remote.read_bytes(name, "checkpoints", newest[0], "state.json")) if newest else None
    found = checkpoint.latest(Path(runs) / name / "checkpoints")
    return json.loads((found / "state.json").read_text()) if found is not None else None


def plan_rows(dataset: TransformedDataset, config: PlaitConfig, replica: int, replicas: int,
              start: tuple[int, int]) -> list[dict[str, Any]]:
    """One row per batch that data replica ``replica`` has still to train on, from ``start`` to the last epoch."""
    run, rows = config.run, []
    sampler = epoch_sampler(dataset, run.seed, replica, replicas)
    for epoch in range(start[0], run.epochs):
        for number, indices in enumerate(batches_of(sampler, run.batch_size, epoch)):
            if epoch > start[0] or number >= start[1]:
                rows.append({"replica": replica, "epoch": epoch, "batch": number, "indices": indices})
    return rows


def plan_name(replica: int) -> str:
    return f"{DATASET}_{replica}"


class DecodeBatches:
    """A Ray Data actor: builds the run's training set once (the plugins' data set and transforms), then turns
    plan rows into collated batches, pickled (a batch holds tensors of any shape, and text)."""

    def __init__(self, raw: dict[str, Any], source: str, cwd: str) -> None:
        if os.path.isdir(cwd):  # the user's relative paths (manifests) are relative to where they ran plait
            os.chdir(cwd)
        torch.set_num_threads(1)
        self.config, plugins = prepare(raw, source)
        dataset = build_dataset(plugins, self.config, "train")
        assert dataset is not None  # build_dataset raises for a missing train split
        self.dataset = dataset

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batches = []
        for epoch, indices in zip(rows["epoch"], rows["indices"], strict=True):
            samples = [self.dataset[(int(i), int(epoch))] for i in indices]  # each its view of the epoch
            batches.append(pickle.dumps(self.dataset.collate_fn(samples), protocol=pickle.HIGHEST_PROTOCOL))
        return {"epoch": rows["epoch"], "batch": rows["batch"], "collated": np.array(batches, dtype=object)}


def decoded(plan: Any, replicas: int, cpus: float, decoder: dict[str, Any]) -> Any:
    """One replica's batches: its plan rows decoded by a pool of ``DecodeBatches`` actors, ``cpus`` CPUs shared
    out over the replicas' pools. Nothing else in the pipeline asks for a CPU: the run needs only the train
    workers' and ``data.cpus``."""
    size = max(1, math.floor(cpus / replicas))
    dataset = plan.map_batches(DecodeBatches, fn_constructor_kwargs=decoder, batch_size=1, concurrency=size,
                               num_cpus=cpus / (replicas * size), batch_format="numpy")
    dataset.context.execution_options.preserve_order = True  # the plan's order (each dataset has its own context)
    dataset.context.enable_progress_bars = False  # the driver draws plait's bar; Ray Data's would interleave
    dataset.context.print_on_execution_start = False
    return dataset


def ray_data_config(replicas: int, cpus: float, decoder: dict[str, Any]) -> Any:
    """Ray Train's ``DataConfig`` for the replicas' plans: it configures one plan when a worker first asks for it
    (``get_dataset_shard``); each worker of the replica reads all of it (a tensor-parallel group reads the same
    batches)."""
    from ray.train import DataConfig

    class ReplicaDataConfig(DataConfig):
        def __init__(self) -> None:
            super().__init__(datasets_to_split=[])

        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                      **kwargs: Any) -> list[dict[str, Any]]:
            iterators = {name: decoded(plan, replicas, cpus, decoder).iterator() for name, plan in datasets.items()}
            return [dict(iterators) for _ in range(world_size)]

    return ReplicaDataConfig()


def datasets_for(config: PlaitConfig, raw: dict[str, Any], runs: str, workers: int,
                 tensor_parallel: int) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The trainer's ``datasets`` (each replica's plan, made afresh at each worker-group start) and its
    ``DataConfig``."""
    import ray.data

    if config.scaling.elastic:
        raise ConfigError(f"{config.source}: data.engine: ray runs a fixed number of workers; give "
                          "scaling.num_workers one count, or use data.engine: torch for an elastic run")
    replicas, cwd = workers // tensor_parallel, os.getcwd()
    decoder = {"raw": raw, "source": config.source, "cwd": cwd}
    name, seed, batch, source = config.run.name, config.run.seed, config.run.batch_size, config.source

    built: dict[str, Any] = {}  # the training set, made once in the controller for every replica's plan

    def plan_of(replica: int) -> Callable[[], Any]:
        def plan() -> Any:
            """Runs in Ray Train's controller, at each start of the worker group."""
            if os.path.isdir(cwd):
                os.chdir(cwd)
            if not built:
                built["config"], plugins = prepare(raw, source)
                built["dataset"] = build_dataset(plugins, built["config"], "train")
            dataset, checked = built["dataset"], built["config"]
            start = start_of(newest_saved_state(runs, name, source),
                             batches_per_epoch(dataset, seed, replicas, batch), replicas)
            return ray.data.from_items(plan_rows(dataset, checked, replica, replicas, start))

        return plan

    return ({plan_name(replica): plan_of(replica) for replica in range(replicas)},
            ray_data_config(replicas, config.data.cpus, decoder))


class _Unpickle:
    """``iter_torch_batches``' collate: one plan row, decoded, back to (epoch, batch number, batch)."""

    def __call__(self, rows: dict[str, np.ndarray]) -> tuple[int, int, dict[str, Any]]:
        return int(rows["epoch"][0]), int(rows["batch"][0]), pickle.loads(rows["collated"][0])


class RayBatches:
    """A training worker's ``TrainBatches`` from its Ray Data shard: one stream over the rest of the run, read
    an epoch at a time."""

    def __init__(self, shard: Any, per_epoch: int, prefetch: int) -> None:
        self.shard, self.per_epoch, self.prefetch = shard, per_epoch, prefetch
        self.stream: Iterator[tuple[int, int, dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def epoch(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        from ray.data.collate_fn import NumpyBatchCollateFn

        if self.stream is None:
            collate = type("UnpickleBatches", (_Unpickle, NumpyBatchCollateFn), {})()
            self.stream = iter(self.shard.iter_torch_batches(batch_size=1, collate_fn=collate,
                                                             prefetch_batches=self.prefetch))
        for number in range(skip, self.per_epoch):
            yield self._next(epoch, number)

    def _next(self, epoch: int, number: int) -> dict[str, Any]:
        assert self.stream is not None
        for got_epoch, got_number, batch in self.stream:
            if (got_epoch, got_number) == (epoch, number):
                return batch
            if (got_epoch, got_number) > (epoch, number):
                raise PlaitError(f"Ray Data sent batch {got_number} of epoch {got_epoch} where this worker "
                                 f"expected batch {number} of epoch {epoch}; the data plan and the checkpoint "
                                 "disagree (was the run's data or batch size changed?)")
            # a batch the checkpoint had done (a resume on another number of replicas): passed over
        raise PlaitError(f"Ray Data's stream ended before batch {number} of epoch {epoch}")


def worker_batches(config: PlaitConfig, data_rank: int,
                   data_world_size: int) -> Callable[[TransformedDataset], RayBatches]:
    """``Distributed.train_batches`` for a Ray Train worker: its data replica's plan."""
    import ray.train

    def make(dataset: TransformedDataset) -> RayBatches:
        per_epoch = batches_per_epoch(dataset, config.run.seed, data_world_size, config.run.batch_size)
        return RayBatches(ray.train.get_dataset_shard(plan_name(data_rank)), per_epoch, config.data.prefetch_batches)

    return make
