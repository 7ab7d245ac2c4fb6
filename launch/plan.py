"""``plait plan CONFIG``: what a training step will hold in each worker's memory, before anything runs.

The model is built on the meta device (no weights are allocated), so a model far larger than this machine
can be planned. Per worker, for the configured strategy and ``scaling.num_workers``:

- parameters, gradients and AdamW's two moments: whole under DDP, 1/N under FSDP;
- under FSDP, the weights and gradients gathered whole at once: the root's own (gathered for the whole
  forward and backward) and the largest other unit's;
- activations for one micro-batch: the peak of a forward, the plugins' loss and the backward of a real batch
  of the configured size, weights and their gradients aside, measured by PyTorch's ``MemTracker`` on meta
  tensors: what autograd saves, activation checkpointing's recomputation and the backward's temporaries;
- the FSDP units, and whether the sum fits ``--device-memory``;
- with ``scaling.tensor_parallel``, which modules each plan splits and how, and which stay whole on every worker
  (their parameters count whole; the split ones' 1/tp); with ``scaling.expert_parallel``, the experts' 1/ep.
  Activations are counted as without tensor parallelism (an upper bound: the split layers' are smaller).

Not counted: the runtime's own memory (libraries and allocator pools on the CPU, the CUDA context on a GPU),
which ``benchmarks/memory.py`` measures beside the plan.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from plait.core.config import PlaitConfig
from plait.core.data import build_dataset, make_loader, move
from plait.core.errors import ConfigError
from plait.core.manager import Plugins
from plait.core.model import build_model
from plait.core.parallel import DTYPES, blocks, checkpoint_activations, fsdp_units, mesh_shape, tensor_parallel_plans
from plait.core.state import RunState
from plait.core.step import loss_terms

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30,
         "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """"24GiB", "80 GB", "512m" -> bytes; anything else is one line."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in UNITS:
        raise ConfigError(f"--device-memory: '{text}' is not a size (give one such as 24GiB, 80GB or 512MiB)")
    return int(float(match[1]) * UNITS[match[2].lower()])


def this_machines_memory(use_gpu: bool) -> int:
    """The GPU's memory where the run uses one and one is here, else this machine's RAM."""
    if use_gpu and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def training_loss(state: RunState, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """The forward's outputs and every plugin's loss terms, summed, as a training step computes them. Keep
    the outputs through the backward, as the loop does (``plait_batch_end`` sees them): a language model's
    logits are a good part of its peak."""
    outputs = state.model(batch)
    return outputs, torch.stack([t.float() for t in loss_terms(state, batch, outputs).values()]).sum()


def meta_step(config: PlaitConfig, plugins: Plugins) -> tuple[RunState, dict[str, Any]]:
    """A run state whose model (in train mode) is built on the meta device where it can be (see ``_build``),
    and the first training batch of the configured size on the model's device: a step to measure, not run."""
    train_set = build_dataset(plugins, config, "train")
    assert train_set is not None
    model = _build(plugins, config, train_set.modalities, len(train_set.classes))
    model.train()
    device = next(model.parameters()).device
    batch = next(iter(make_loader(train_set, config.run.batch_size, True, config.run.seed, 0)))
    state = RunState(config=config, plugins=plugins, run_dir=Path(config.run.runs_dir), device=device, model=model,
                     classes=list(train_set.classes), modalities=train_set.modalities)
    return state, move(batch, device)


def _activation_bytes(state: RunState, batch: dict[str, Any]) -> int:
    """The peak memory of one micro-batch's forward, loss and backward above the weights: each gradient is
    dropped as it arrives (the state's share is counted apart), so what remains is activations and
    temporaries, as PyTorch's ``MemTracker`` attributes them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = state.model
    drops = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in model.parameters() if p.requires_grad]
    tracker = MemTracker()
    tracker.track_external(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "expected a tensor": the gradients dropped above
            with tracker:
                outputs, loss = training_loss(state, batch)
                loss.backward()
                del outputs
    finally:
        for handle in drops:
            handle.remove()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return int(peak["Total"] - sum(p.numel() * p.element_size() for p in model.parameters()))


def _build(plugins: Plugins, config: PlaitConfig, modalities: tuple[str, ...], classes: int) -> torch.nn.Module:
    """The model on the meta device, where every module can be built there; on the CPU otherwise
    (torchaudio's mel filters read a value while they are built)."""
    try:
        with torch.device("meta"):
            return build_model(plugins, config, modalities, classes)
    except RuntimeError as exc:
        if "meta" not in str(exc):
            raise
        return build_model(plugins, config, modalities, classes)


def _gathered_bytes(model: torch.nn.Module, units: list[torch.nn.Module], dtype: torch.dtype | None) -> int:
    """The weights and unsharded gradients FSDP holds whole at once: the root's own, which it keeps gathered
    from its forward to the end of the backward, and the largest other unit's."""
    def size(params: list[torch.nn.Parameter]) -> int:
        return sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in params)

    claimed: set[int] = set()
    own = []  # each unit's parameters less those of the units inside it (``units`` is innermost first)
    for unit in units:
        mine = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in mine)
        own.append(size(mine))
    root = size([p for p in model.parameters() if id(p) not in claimed])
    return 2 * (root + max(own, default=0))


def _split(model: torch.nn.Module, tensor: int, expert: int) -> tuple[dict[int, float], dict[str, Any]]:
    """Each parameter's share that one worker holds (by ``id``; absent: all of it) under tensor and expert
    parallelism, and what the tensor-parallel plans split: {module: {submodule: style}} and the whole modules."""
    share: dict[int, float] = {}
    layout: dict[str, Any] = {}
    if tensor > 1:
        split: dict[str, dict[str, str]] = {}
        for name, module, module_plan in tensor_parallel_plans(model, tensor):
            split[name or "model"] = {part: type(style).__name__ for part, style in module_plan.items()}
            for part in module_plan:
                share.update({id(p): 1 / tensor for p in module.get_submodule(part).parameters()})
        encoders = getattr(model, "encoders", None)
        parts = [(f"encoders.{m}", e) for m, e in (encoders.items() if isinstance(encoders, torch.nn.ModuleDict)
                                                   else [])]
        parts += [(name, child) for name, child in model.named_children() if name != "encoders"]
        whole = [name for name, part in parts
                 if not any(id(p) in share for p in part.parameters()) and any(True for _ in part.parameters())]
        layout["tensor_parallel"] = {"size": tensor, "split": split, "whole": whole}
    if expert > 1:
        for module in model.modules():
            share.update({id(getattr(module, name)): 1 / expert
                          for name in getattr(module, "plait_expert_parameters", ())})
    return share, layout


def plan(config: PlaitConfig, plugins: Plugins, device_memory: int | None = None) -> dict[str, Any]:
    """The per-worker memory plan of ``config``'s model (see the module docstring)."""
    scaling, run = config.scaling, config.run
    workers = max(1, scaling.max_workers)
    mesh = mesh_shape(scaling, config.source)
    run_state, batch = meta_step(config, plugins)
    model, device = run_state.model, run_state.device
    split, layout = _split(model, mesh.tensor, mesh.expert)
    checkpoint_activations(model, run.activation_checkpointing, run.activation_checkpointing_every)
    params = list(model.parameters())

    def held(p: torch.nn.Parameter) -> float:
        return p.numel() * p.element_size() * split.get(id(p), 1.0)

    param_bytes = sum(held(p) for p in params)
    trainable = sum(held(p) for p in params if p.requires_grad)
    sharded = scaling.strategy == "fsdp" and mesh.data > 1
    units = fsdp_units(model, scaling.fsdp.units) if sharded else []  # the units the runner shards, in order
    share = 1 / mesh.data if sharded else 1.0
    state = {"parameters": param_bytes * share, "gradients": trainable * share, "optimizer": 2 * trainable * share}
    compute = DTYPES["bfloat16"] if run.precision == "bf16" or scaling.fsdp.param_dtype == "bfloat16" else None
    gathered = _gathered_bytes(model, [unit for _, unit in units], compute) if sharded else 0
    if compute is not None:  # activations in the compute dtype (autocast and FSDP's param_dtype)
        model.to(compute)
    activations = _activation_bytes(run_state, batch)
    total = sum(state.values()) + gathered + activations
    limit = device_memory if device_memory is not None else this_machines_memory(scaling.use_gpu)
    return {
        "strategy": scaling.strategy, "workers": workers, "parameters": sum(p.numel() for p in params),
        "per_worker_bytes": {**{k: int(v) for k, v in state.items()}, "gathered_unit": int(gathered),
                             "activations": int(activations), "total": int(total)},
        "units": [name for name, _ in units], "blocks": len(blocks(model)), "built_on": device.type,
        "device_memory": limit, "fits": total <= limit,
        "mesh": {"data_parallel": mesh.data, "tensor_parallel": mesh.tensor, "expert_parallel": mesh.expert},
        **layout,
    }


def print_plan(source: str | Path, result: dict[str, Any]) -> None:
    mib = 2**20
    sizes = result["per_worker_bytes"]
    print(f"{source}: {result['parameters'] / 1e6:.1f} M parameters, {result['strategy']} on "
          f"{result['workers']} worker(s), {result['blocks']} declared blocks (built on {result['built_on']})")
    for key in ("parameters", "gradients", "optimizer", "gathered_unit", "activations", "total"):
        print(f"  {key:<14} {sizes[key] / mib:>12,.1f} MiB per worker")
    if result["units"]:
        print(f"  FSDP units ({len(result['units'])}): {', '.join(result['units'][:8])}"
              + (" ..." if len(result["units"]) > 8 else ""))
    tensor = result.get("tensor_parallel")
    if tensor:
        for module, parts in tensor["split"].items():
            styles: dict[str, int] = {}
            for style in parts.values():
                styles[style] = styles.get(style, 0) + 1
            print(f"  tensor parallel {tensor['size']}: {module}: {len(parts)} submodules split ("
                  + ", ".join(f"{style} {count}" for style, count in sorted(styles.items())) + ")")
        if tensor["whole"]:
            print(f"  whole on every worker: {', '.join(tensor['whole'])}")
    if result["mesh"]["expert_parallel"] > 1:
        print(f"  expert parallel {result['mesh']['expert_parallel']}: each worker holds 1/"
              f"{result['mesh']['expert_parallel']} of every MoE layer's experts")
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(f"  {verdict} in {result['device_memory'] / 2**30:.1f} GiB")
