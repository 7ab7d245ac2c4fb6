"""How a model is split across workers and what it recomputes: the device mesh, the blocks its modules declare,
FSDP2 units made of them, tensor- and expert-parallel plans, and activation checkpointing.

A module built by a plugin declares its repeated blocks with a ``plait_blocks()`` method that returns some of
its submodules (a transformer's layers, a CNN's stages). The core never guesses them from class names, and a
third-party encoder takes part by defining the same method. torchtitan's ``parallelize`` functions do the same
per model: blocks first (activation checkpointing, then ``fully_shard``), the containers after, the root last.

Tensor and expert parallelism follow the same rule: a module that can be split says how, with a
``plait_tensor_parallel(tp)`` method returning a plan for ``torch.distributed.tensor.parallel.parallelize_module``
(torchtitan's ``parallelize_llama`` plans), or a ``plait_expert_parallel(mesh)`` method that keeps its share of the
experts. Modules without a plan stay whole on every worker.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from .config import FsdpSettings, ScalingSettings
from .errors import ConfigError, PluginError

__all__ = ["COMPILING", "DTYPES", "HeadParallel", "Mesh", "MeshShape", "blocks", "build_mesh", "checkpoint_activations",
           "compile_blocks", "compiled_after", "expert_modules", "expert_parallel", "fsdp_units", "local_tensor",
           "mesh_shape", "shard", "tensor_parallel", "tensor_parallel_plans", "transformer_plan"]

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


def shard(model: nn.Module, settings: FsdpSettings, mesh: Any = None) -> list[str]:
    """FSDP2 over ``mesh`` (the data-parallel dimension of a 2-D mesh with tensor parallelism) or the default
    process group: each unit (see ``FsdpSettings.units``), then the root. A worker holds 1/(data replicas) of
    each unit's weights, gradients and optimizer state and gathers one unit at a time. Returns the units' names."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=DTYPES[settings.param_dtype],
                                  reduce_dtype=DTYPES[settings.reduce_dtype])
    options: dict[str, Any] = {"mp_policy": policy, "reshard_after_forward": settings.reshard_after_forward}
    if mesh is not None:
        options["mesh"] = mesh
    units = fsdp_units(model, settings.units)
    for _, unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return [name for name, _ in units]


@dataclass(frozen=True)
class MeshShape:
    """How the workers divide the work: ``data`` replicas, each a group of ``tensor`` workers that split its
    matrices; ``expert`` of the data replicas split the experts between them."""

    data: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def workers(self) -> int:
        return self.data * self.tensor


def mesh_shape(scaling: ScalingSettings, source: str = "<config>", checkpoint_format: str = "full",
               workers: int | None = None) -> MeshShape:
    """The mesh that ``scaling`` asks for over ``workers`` (default: the most it runs), checked against the
    workers and ``run.checkpoint_format`` (one line for each mistake)."""
    tp, ep = scaling.tensor_parallel, scaling.expert_parallel
    workers = workers or max(1, scaling.max_workers)
    where = f"{source}: scaling"
    if scaling.elastic and (tp > 1 or ep > 1 or scaling.data_parallel != "auto"):
        raise ConfigError(f"{where}.num_workers: an elastic range runs data parallelism only; tensor_parallel, "
                          "expert_parallel and data_parallel need a fixed worker count")
    for name, size in (("tensor_parallel", tp), ("expert_parallel", ep)):
        if size > workers:
            raise ConfigError(f"{where}.{name}: {size} is more than the {workers} worker(s) of scaling.num_workers: "
                              "the mesh cannot be larger than the workers")
    if workers % tp:
        raise ConfigError(f"{where}.tensor_parallel: {tp} does not divide the {workers} workers of scaling.num_workers")
    dp = workers // tp if scaling.data_parallel == "auto" else scaling.data_parallel
    if dp * tp != workers:
        raise ConfigError(f"{where}: data_parallel {dp} x tensor_parallel {tp} = {dp * tp} workers, but "
                          f"scaling.num_workers is {workers}: the mesh cannot be larger or smaller than the workers")
    if dp % ep:
        raise ConfigError(f"{where}.expert_parallel: {ep} does not divide the {dp} data-parallel worker(s) (the "
                          "experts are split between workers that see different batches)")
    if ep > 1 and tp > 1:
        raise ConfigError(f"{where}: expert_parallel with tensor_parallel is not supported yet; use one of the two")
    if ep > 1 and scaling.strategy == "fsdp":
        raise ConfigError(f"{where}: expert_parallel with strategy fsdp is not supported yet; use strategy: ddp")
    if tp > 1 and dp > 1 and scaling.strategy == "ddp":
        raise ConfigError(f"{where}: tensor_parallel {tp} with data_parallel {dp} needs strategy: fsdp (FSDP2 over the "
                          "data-parallel dimension of the mesh, as torchtitan does); DDP cannot hold split weights")
    if tp > 1 and dp > 1 and checkpoint_format == "sharded":
        raise ConfigError(f"{source}: run.checkpoint_format: sharded with FSDP x tensor_parallel is not supported "
                          "yet (the packed attention rows, split both ways, do not come back from DCP's layout); "
                          "the full format gathers the weights and loads on any mesh")
    return MeshShape(data=dp, tensor=tp, expert=ep)


@dataclass
class Mesh:
    """The device meshes of one worker: ``tensor`` (its tensor-parallel group) and ``data`` (the workers holding
    the same slice, FSDP's dimension) when tensor_parallel > 1; ``expert`` (the workers splitting the experts)
    and ``expert_replicas`` (those holding the same experts) when expert_parallel > 1."""

    shape: MeshShape
    tensor: Any = None
    data: Any = None
    expert: Any = None
    expert_replicas: Any = None


def build_mesh(shape: MeshShape, device: torch.device) -> Mesh:
    """The meshes of ``shape`` over the default process group (collective: every worker calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = Mesh(shape=shape)
    if shape.tensor > 1:
        grid = init_device_mesh(device.type, (shape.data, shape.tensor), mesh_dim_names=("dp", "tp"))
        mesh.tensor, mesh.data = grid["tp"], grid["dp"]
    if shape.expert > 1:
        grid = init_device_mesh(device.type, (shape.data // shape.expert, shape.expert),
                                mesh_dim_names=("expert_replicas", "ep"))
        mesh.expert = grid["ep"]
        mesh.expert_replicas = grid["expert_replicas"] if shape.data > shape.expert else None
    return mesh


def tensor_parallel_plans(model: nn.Module, tp: int) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """Each module's tensor-parallel plan for ``tp`` workers, as (name, module, plan); the modules check that
    ``tp`` divides their heads. An error when no module has one: the run would split nothing."""
    found = []
    for name, module in model.named_modules():
        plan_for = getattr(module, "plait_tensor_parallel", None)
        if callable(plan_for):
            plan = plan_for(tp)
            if plan:
                found.append((name, module, plan))
    if not found:
        kinds = sorted({type(m).__name__ for m in model.children()})
        raise ConfigError(f"scaling.tensor_parallel: {tp}, but no module of the model has a tensor-parallel plan (a "
                          f"plait_tensor_parallel() method; the model's modules: {', '.join(kinds)}); set "
                          "scaling.tensor_parallel: 1")
    return found


def tensor_parallel(model: nn.Module, mesh: Any) -> list[str]:
    """Split every module that has a plan over the tensor-parallel ``mesh``; returns the split submodules' names."""
    from torch.distributed.tensor.parallel import parallelize_module

    split = []
    for name, module, plan in tensor_parallel_plans(model, mesh.size()):
        parallelize_module(module, mesh, plan)
        split += [f"{name}.{part}" if name else part for part in plan]
    return split


def expert_modules(model: nn.Module, ep: int) -> list[tuple[str, nn.Module]]:
    """The modules with experts to split ``ep`` ways (a ``plait_expert_parallel(mesh)`` method), as (name, module);
    an error when there is none: the run would split nothing."""
    found = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "plait_expert_parallel", None))]
    if not found:
        raise ConfigError(f"scaling.expert_parallel: {ep}, but the model has no experts to split (add the moe "
                          "plugin, or set scaling.expert_parallel: 1)")
    return found


def expert_parallel(model: nn.Module, mesh: Any) -> list[str]:
    """Every module with experts keeps its share of them on the expert-parallel ``mesh``; returns their names."""
    found = expert_modules(model, mesh.size())
    for _, module in found:
        cast(Any, module).plait_expert_parallel(mesh)
    return [name for name, _ in found]


class HeadParallel(ParallelStyle):
    """``nn.MultiheadAttention`` (self-attention, batch first) with its heads split over the tensor-parallel mesh:
    each worker keeps the query, key and value rows of its heads (``in_proj_weight`` is packed [q; k; v], so its
    rows are dealt out in three strided pieces) and the matching columns of the output projection, whose partial
    sums are all-reduced. The parameters keep their names and full shapes, so checkpoints load whole anywhere."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard  # how torch itself writes strided rows

        attention = cast(nn.MultiheadAttention, module)
        if not isinstance(attention, nn.MultiheadAttention) or not attention._qkv_same_embed_dim:
            raise PluginError(f"HeadParallel splits nn.MultiheadAttention with packed projections, not "
                              f"{type(module).__name__}")
        if not attention.batch_first:
            raise PluginError("HeadParallel needs nn.MultiheadAttention(batch_first=True)")

        def split(tensor: torch.Tensor, placement: Any) -> nn.Parameter:
            return nn.Parameter(distribute_tensor(tensor.data, device_mesh, [placement]),
                                requires_grad=tensor.requires_grad)

        rows = _StridedShard(0, split_factor=3)
        attention.in_proj_weight = split(attention.in_proj_weight, rows)
        if attention.in_proj_bias is not None:
            attention.in_proj_bias = split(attention.in_proj_bias, rows)
        attention.out_proj.weight = split(attention.out_proj.weight, Shard(1))
        if attention.out_proj.bias is not None:
            attention.out_proj.bias = split(attention.out_proj.bias, Replicate())
        setattr(attention, "plait_tp_mesh", device_mesh)  # noqa: B010 - read by the forward below
        attention.forward = types.MethodType(_head_parallel_attention, attention)  # type: ignore[method-assign]
        return attention


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's part of ``tensor``: a DTensor's local piece (differentiable), any other tensor itself."""
    return cast(torch.Tensor, tensor.to_local()) if hasattr(tensor, "to_local") else tensor


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return local_tensor(tensor) if tensor is not None else None


def _head_parallel_attention(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                             attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                             is_causal: bool = False) -> tuple[torch.Tensor, None]:
    """This worker's heads of self-attention; the output is every head's, summed over the mesh."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if key is not query or value is not query:
        raise PluginError("tensor-parallel attention (HeadParallel) is self-attention only")
    mesh = getattr(self, "plait_tp_mesh")  # noqa: B009
    # the input is the same on every worker; its gradient is each worker's heads' share, all-reduced
    x = DTensor.from_local(query, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    qkv = F.linear(x, cast(torch.Tensor, _local(self.in_proj_weight)), _local(self.in_proj_bias))
    batch, length, heads = x.shape[0], x.shape[1], self.num_heads // mesh.size()
    q, k, v = (t.reshape(batch, length, heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = _additive_mask(attn_mask, key_padding_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                         is_causal=is_causal and mask is None)
    partial = F.linear(out.transpose(1, 2).reshape(batch, length, heads * self.head_dim),
                       cast(torch.Tensor, _local(self.out_proj.weight)))
    summed = DTensor.from_local(partial, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    result = summed.to_local()
    bias = _local(self.out_proj.bias)
    return (result + bias if bias is not None else result), None


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True or -inf: not attended) as one additive mask for SDPA."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = additive(attn_mask) if attn_mask is not None else None
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def transformer_plan(stack: nn.Module, tp: int, what: str) -> dict[str, Any]:
    """The plan of an ``nn.TransformerEncoder`` (names relative to ``stack``): each layer's attention split by
    heads (``HeadParallel``), its feed-forward block's first linear by columns and second by rows, as Megatron
    does. A layer whose feed-forward block is not those two linears (an MoE layer) keeps it whole. ``what``
    names the stack in the error for heads that ``tp`` does not divide."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for i, layer in enumerate(getattr(stack, "layers", [])):
        attention = getattr(layer, "self_attn", None)
        if isinstance(attention, nn.MultiheadAttention):
            if attention.num_heads % tp:
                raise ConfigError(f"scaling.tensor_parallel: {tp} does not divide the {attention.num_heads} attention "
                                  f"heads of {what}")
            plan[f"layers.{i}.self_attn"] = HeadParallel()
        if isinstance(getattr(layer, "linear1", None), nn.Linear) and isinstance(getattr(layer, "linear2", None),
                                                                                nn.Linear):
            plan[f"layers.{i}.linear1"] = ColwiseParallel()
            plan[f"layers.{i}.linear2"] = RowwiseParallel()
    return plan
