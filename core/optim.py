"""The optimizer's parameter groups: per-part learning rates, weight decay and freezing.

A plugin that builds a part of the model (an encoder, the fusion, the head, a projection it adds)
says how that part trains through ``plait_parameter_groups``, usually from the ``TrainingControl``
options its YAML block inherits. Each group becomes AdamW parameter groups of its own; parameters no
group claims train with ``run.lr`` and ``run.weight_decay``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from . import hookspecs
from .config import Options, PlaitConfig, RunSettings
from .distributed import unwrap
from .errors import PluginError
from .manager import Plugins
from .step import lr_factor

__all__ = ["DEFAULT_GROUP", "ParameterGroup", "TrainingControl", "apply_freezing", "build_optimizer", "schedule"]

log = logging.getLogger("plait")

#: The name of the group of every parameter that no plugin's group claims.
DEFAULT_GROUP = "default"


class TrainingControl(Options):
    """How one part of the model trains; the options of each part's YAML block (an encoder's, the fusion's,
    the head's)."""

    freeze: bool = Field(False, description="no gradients at all: the weights stay as built or loaded, and "
                         "their backward pass is not computed")
    lr_scale: float = Field(1.0, gt=0, description="this part's learning rate is run.lr times this")
    weight_decay: float | None = Field(None, ge=0, description="this part's weight decay (default: run.weight_decay)")
    unfreeze_at_step: int | None = Field(
        None, ge=1, description="held for the first N optimizer steps (learning rate 0), trained after: train the "
        "head first. Held weights still get gradients, so DDP and FSDP see the same parameters throughout")

    def group(self, name: str, module: nn.Module) -> ParameterGroup:
        return ParameterGroup(name=name, module=module, lr_scale=self.lr_scale, weight_decay=self.weight_decay,
                              freeze=self.freeze, unfreeze_at_step=self.unfreeze_at_step)


@dataclass(frozen=True)
class ParameterGroup:
    """What ``plait_parameter_groups`` returns: the parameters of ``module`` (a submodule of the model)
    and how they train. Where groups nest, a parameter belongs to the innermost."""

    name: str
    module: nn.Module
    lr_scale: float = 1.0
    weight_decay: float | None = None
    freeze: bool = False
    unfreeze_at_step: int | None = None


@dataclass(frozen=True)
class _Claim:
    group: ParameterGroup
    prefix: str  # the module's name in the plain model, with a trailing dot ("" for the whole model)
    plugin: str


def _claims(plugins: Plugins, config: PlaitConfig, model: nn.Module) -> list[_Claim]:
    """Every plugin's groups, each located in ``model`` (the plain model, before any wrapping)."""
    names = {id(module): name for name, module in model.named_modules()}
    claims: list[_Claim] = []
    returned = plugins.call_each(hookspecs.plait_parameter_groups, model=model, config=config)
    for plugin, groups in returned.items():
        for group in groups or []:
            if id(group.module) not in names:
                raise PluginError(f"plugin '{plugin}': parameter group '{group.name}' names a module that is not "
                                  "part of the model")
            prefix = names[id(group.module)]
            for other in claims:
                if other.prefix.rstrip(".") == prefix or other.group.name == group.name:
                    raise PluginError(f"plugin '{plugin}': parameter group '{group.name}' ({prefix or 'the model'})"
                                      f" is already plugin '{other.plugin}''s group '{other.group.name}'")
            claims.append(_Claim(group, f"{prefix}." if prefix else "", plugin))
    return sorted(claims, key=lambda claim: -len(claim.prefix))  # innermost first


def _owner(name: str, claims: list[_Claim]) -> ParameterGroup | None:
    return next((claim.group for claim in claims if name.startswith(claim.prefix)), None)


def apply_freezing(plugins: Plugins, config: PlaitConfig, model: nn.Module) -> list[_Claim]:
    """Ask the plugins for their groups and freeze the frozen ones (before DDP or FSDP wrap the model, which
    then leave those parameters out); the groups, for ``build_optimizer``."""
    claims = _claims(plugins, config, model)
    for name, param in model.named_parameters():
        group = _owner(name, claims)
        if group is not None and group.freeze:
            param.requires_grad_(False)
    frozen = [claim.group.name for claim in claims if claim.group.freeze]
    if frozen:
        log.info("frozen: %s", ", ".join(frozen))
    return claims


def build_optimizer(model: nn.Module, claims: list[_Claim], run: RunSettings) -> torch.optim.AdamW:
    """AdamW over the parameters that train, one or two parameter groups per plait group: the split parameters
    (DTensors: tensor- or expert-parallel, or sharded by FSDP) apart from the whole ones, since a fused AdamW
    step takes one kind or the other. Each group carries its ``name``, by which a checkpoint's groups are
    matched on resume (``checkpoint.regroup``)."""
    from torch.distributed.tensor import DTensor

    by_group: dict[tuple[str, bool], list[nn.Parameter]] = {}
    settings: dict[str, ParameterGroup | None] = {DEFAULT_GROUP: None}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        group = _owner(name, claims)
        key = group.name if group is not None else DEFAULT_GROUP
        settings[key] = group
        by_group.setdefault((key, isinstance(param, DTensor)), []).append(param)
    groups: list[dict[str, Any]] = []
    for (key, _), params in by_group.items():
        group = settings[key]
        decay = run.weight_decay if group is None or group.weight_decay is None else group.weight_decay
        groups.append({"params": params, "name": key, "lr": run.lr * (group.lr_scale if group else 1.0),
                       "weight_decay": decay, "held_until": (group.unfreeze_at_step or 0) if group else 0})
    if not groups:
        raise PluginError("every parameter of the model is frozen: nothing would train")
    # fused: one kernel for all parameters (the per-tensor loop costs ~25 ms a step on CPU)
    return torch.optim.AdamW(groups, lr=run.lr, weight_decay=run.weight_decay, fused=True)


def schedule(optimizer: torch.optim.Optimizer, run: RunSettings, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule, per group: ``run.schedule`` with its warm-up, times 0 while a group is held
    (``unfreeze_at_step``). A held group's gradients still flow and AdamW's moments follow them, so every
    parameter has optimizer state from the first step and a resume is exact; its weights and their decay wait."""
    def factor(held_until: int) -> Callable[[int], float]:
        return lambda step: 0.0 if step < held_until else lr_factor(step, run.warmup_steps, total_steps,
                                                                     run.schedule)

    factors = [factor(group["held_until"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
