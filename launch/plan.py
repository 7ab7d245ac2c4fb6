"""``plait plan CONFIG``: what a training step will hold in each worker's memory, before anything runs.

The model is built on the meta device (no weights are allocated), so a model far larger than this machine
can be planned. Per worker, for the configured strategy and ``scaling.num_workers``:

- parameters, gradients and AdamW's two moments: whole under DDP, 1/N under FSDP, plus the largest FSDP
  unit gathered whole for its forward and backward;
- activations for one micro-batch: the bytes autograd saves for the backward pass in a forward of a real
  batch of the configured size, measured on meta tensors (activation checkpointing included);
- the FSDP units, and whether the sum fits ``--device-memory``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from plait.core.config import PlaitConfig
from plait.core.data import build_dataset, make_loader, move
from plait.core.errors import ConfigError
from plait.core.manager import Plugins
from plait.core.model import build_model
from plait.core.parallel import blocks, checkpoint_activations, fsdp_units

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


def _storage(tensor: torch.Tensor) -> int:
    """An id of the memory a tensor views: views of one tensor share it (meta tensors have no address)."""
    return int(tensor.untyped_storage()._cdata)


def _activation_bytes(model: torch.nn.Module, batch: dict[str, Any]) -> int:
    """What autograd saves for the backward pass in one forward of ``batch``, weights (and views of them)
    aside: each distinct piece of memory once."""
    weights = {_storage(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage(tensor)
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(batch)
    return sum(saved.values())


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


def plan(config: PlaitConfig, plugins: Plugins, device_memory: int | None = None) -> dict[str, Any]:
    """The per-worker memory plan of ``config``'s model (see the module docstring)."""
    scaling, run = config.scaling, config.run
    workers = max(1, scaling.num_workers)
    train_set = build_dataset(plugins, config, "train")
    assert train_set is not None
    model = _build(plugins, config, train_set.modalities, len(train_set.classes))
    device = next(model.parameters()).device
    checkpoint_activations(model, run.activation_checkpointing, run.activation_checkpointing_every)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    sharded = scaling.strategy == "fsdp" and workers > 1
    units = fsdp_units(model, scaling.fsdp.units) if sharded else []  # the units the runner shards, in order
    unit_bytes = [sum(p.numel() * p.element_size() for p in unit.parameters()) for _, unit in units]
    share = 1 / workers if sharded else 1.0
    state = {"parameters": param_bytes * share, "gradients": trainable * share, "optimizer": 2 * trainable * share}
    gathered = 2 * max(unit_bytes, default=0) if sharded else 0  # one unit's weights and gradients, whole
    batch = next(iter(make_loader(train_set, run.batch_size, True, run.seed, 0)))
    model.train()
    activations = _activation_bytes(model, move(batch, device))
    total = sum(state.values()) + gathered + activations
    limit = device_memory if device_memory is not None else this_machines_memory(scaling.use_gpu)
    return {
        "strategy": scaling.strategy, "workers": workers, "parameters": sum(p.numel() for p in params),
        "per_worker_bytes": {**{k: int(v) for k, v in state.items()}, "gathered_unit": int(gathered),
                             "activations": int(activations), "total": int(total)},
        "units": [name for name, _ in units], "blocks": len(blocks(model)), "built_on": device.type,
        "device_memory": limit, "fits": total <= limit,
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
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(f"  {verdict} in {result['device_memory'] / 2**30:.1f} GiB")
