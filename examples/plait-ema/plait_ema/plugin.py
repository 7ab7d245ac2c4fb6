"""An exponential moving average (EMA) of the model's weights, updated after every optimizer
step: ``ema = decay * ema + (1 - decay) * weights``. The average is part of every checkpoint
(``plait_state_dict``), so a resumed run continues the same average, and the run folder gets
``ema.safetensors`` at the end: load it in place of the last checkpoint's weights for
evaluation, as EMA weights usually generalise better.

    plugins:
      ...
      ema: {decay: 0.999}
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import Field
from safetensors.torch import save_file

from plait.core.config import Options
from plait.core.distributed import unwrap
from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

PLAIT_API = ">=1.4,<2"  # plugins.stash came in 1.4


class EmaOptions(Options):
    decay: float = Field(0.999, gt=0, lt=1, description="weight of the running average per step")


@dataclass
class _Average:
    """The running average of one run, kept in that run's ``plugins.stash`` (a process may train
    several runs, one after the other)."""

    shadow: dict[str, torch.Tensor] = field(default_factory=dict)
    restored: bool = False


AVERAGE = StashKey[_Average]()


def _average(state) -> _Average:
    return state.plugins.stash.setdefault(AVERAGE, _Average())


def _weights(state) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in unwrap(state.model).named_parameters()}


@hookimpl
def plait_config_schema():
    return EmaOptions


@hookimpl
def plait_load_state_dict(state, data):
    average = _average(state)
    average.shadow = {name: tensor.to(state.device) for name, tensor in data["shadow"].items()}
    average.restored = True


@hookimpl
def plait_fit_start(state):
    average = _average(state)
    if not average.restored:  # a new run starts from its initial weights
        average.shadow = {name: w.clone() for name, w in _weights(state).items()}


@hookimpl
def plait_batch_end(state):
    decay = state.config.options(EmaOptions).decay
    shadow, weights = _average(state).shadow, _weights(state)
    names = list(shadow)
    with torch.no_grad():
        torch._foreach_lerp_([shadow[n] for n in names], [weights[n] for n in names], 1.0 - decay)


@hookimpl
def plait_state_dict(state):
    return {"shadow": {name: t.cpu() for name, t in _average(state).shadow.items()}}


@hookimpl
def plait_fit_end(state):
    if state.is_main:
        shadow = _average(state).shadow
        save_file({name: t.cpu().contiguous() for name, t in shadow.items()}, str(state.run_dir / "ema.safetensors"))
