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

import torch
from pydantic import Field
from safetensors.torch import save_file

from plait.core.config import Options
from plait.core.hookspecs import hookimpl

PLAIT_API = ">=1.1,<2"


class EmaOptions(Options):
    decay: float = Field(0.999, gt=0, lt=1, description="weight of the running average per step")


class _Average:
    """The running average of one run (one process trains one run at a time)."""

    shadow: dict[str, torch.Tensor] = {}
    restored = False


def _weights(state) -> dict[str, torch.Tensor]:
    model = getattr(state.model, "module", state.model)  # the plain model inside DDP
    return {name: p.detach() for name, p in model.named_parameters()}


@hookimpl
def plait_config_schema():
    return EmaOptions


@hookimpl
def plait_load_state_dict(state, data):
    _Average.shadow = {name: tensor.to(state.device) for name, tensor in data["shadow"].items()}
    _Average.restored = True


@hookimpl
def plait_fit_start(state):
    if not _Average.restored:  # a new run starts from its initial weights
        _Average.shadow = {name: w.clone() for name, w in _weights(state).items()}
    _Average.restored = False


@hookimpl
def plait_batch_end(state):
    decay = state.config.options(EmaOptions).decay
    weights = _weights(state)
    names = list(_Average.shadow)
    with torch.no_grad():
        torch._foreach_lerp_([_Average.shadow[n] for n in names], [weights[n] for n in names], 1.0 - decay)


@hookimpl
def plait_state_dict(state):
    return {"shadow": {name: t.cpu() for name, t in _Average.shadow.items()}}


@hookimpl
def plait_fit_end(state):
    if state.is_main:
        save_file({name: t.cpu().contiguous() for name, t in _Average.shadow.items()}, str(state.run_dir / "ema.safetensors"))
