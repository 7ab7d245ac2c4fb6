"""What the loop needs from torch.distributed, and how a runner plugs into it.

Every collective here is the identity in one process, so the loop has one code path whether
it runs alone or in a Ray Train worker.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from .data import TrainBatches, TransformedDataset

__all__ = ["DataReplicas", "Distributed", "all_gather", "all_reduce_max", "all_reduce_sum", "barrier", "peak_memory_mb",
           "pick_device", "rank", "seed_everything", "sync_buffers", "unwrap"]


def _identity(model: torch.nn.Module) -> torch.nn.Module:
    return model


def _same_loader(loader: DataLoader[Any], add_dist_sampler: bool) -> DataLoader[Any]:
    return loader


def _nothing(model: torch.nn.Module) -> None:
    return None


class DataReplicas:
    """Which data replica a worker is, for a class with ``rank``, ``world_size`` and ``tensor_parallel``: the
    workers of one tensor-parallel group (neighbouring ranks) see the same batches and count as one."""

    rank: int
    world_size: int
    tensor_parallel: int

    @property
    def data_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def data_world_size(self) -> int:
        return self.world_size // self.tensor_parallel


@dataclass
class Distributed(DataReplicas):
    """How a distributed runner plugs into ``fit``; the defaults are one process.

    ``parallelize(model)`` splits the plain model's modules (tensor and expert parallelism) before
    activation checkpointing and compilation; ``prepare_model(model)`` then wraps it for data
    parallelism (DDP, FSDP). ``prepare_loader(loader, add_dist_sampler)`` may swap the sampler for a
    distributed one over the data replicas (training); evaluation loaders come already sharded and
    ask for no sampler; ``train_batches(dataset)``, when given, supplies the training batches instead of a
    DataLoader (Ray Data). ``reduce_gradients(model)`` finishes what the wrapper does not reduce (the
    experts' gradients under expert parallelism) before clipping. Collectives go through
    ``torch.distributed`` when a process group is initialised.

    The workers of one tensor-parallel group (``tensor_parallel`` of them) see the same batches:
    ``data_rank`` and ``data_world_size`` are which data replica a worker is and how many there are.
    """

    rank: int = 0
    world_size: int = 1
    parallelize: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    prepare_loader: Callable[[DataLoader[Any], bool], DataLoader[Any]] = _same_loader
    reduce_gradients: Callable[[torch.nn.Module], None] = _nothing
    train_batches: Callable[[TransformedDataset], TrainBatches] | None = None
    device: torch.device | None = None
    #: Every forward is a collective (FSDP gathers each unit's weights, tensor parallelism all-reduces
    #: activations): evaluation then runs the same number of batches on every worker, repeating its
    #: last batch where it has fewer.
    lockstep: bool = False
    tensor_parallel: int = 1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This worker's global rank (0 in one process)."""
    return torch.distributed.get_rank() if _distributed() else 0


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all workers (identity in one process)."""
    return _all_reduce(values, torch.distributed.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maxima over all workers (identity in one process)."""
    return _all_reduce(values, torch.distributed.ReduceOp.MAX)


def _all_reduce(values: list[float], op: Any) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=op)
    reduced: list[float] = tensor.tolist()
    return reduced


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far: resident set (the CPU's), and on CUDA what the caching
    allocator allocated and reserved at most."""
    import resource

    peak: dict[str, float] = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB
    if device.type == "cuda":
        peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        peak["cuda_reserved"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return peak


def barrier() -> None:
    """Wait for every worker (nothing in one process)."""
    if _distributed():
        torch.distributed.barrier()


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
        for buffer, value in zip(same, torch.split(flat, [b.numel() for b in same]), strict=True):
            buffer.copy_(value.view_as(buffer))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside a DDP wrapper (checkpoints hold the plain weights); an FSDP or
    plain model is its own."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
