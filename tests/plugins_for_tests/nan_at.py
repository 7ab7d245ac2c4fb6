"""A test plugin: makes chosen optimizer steps non-finite, in the loss (a ``poison`` term) or in
the input (every image pixel NaN, which also reaches BatchNorm's running statistics), and records
whether the model's weights and buffers were the same before and after each poisoned step
(``unchanged``: one bool per poisoned step that was skipped)."""
from typing import Literal

import torch

from plait.core.config import Options
from plait.core.hookspecs import hookimpl


class NanAtOptions(Options):
    steps: list[int]
    where: Literal["loss", "input"] = "loss"
    value: float = float("nan")


_fired: set[int] = set()  # a skipped step is tried again with the next batch: poison each step once
_before: dict[int, dict[str, torch.Tensor]] = {}
unchanged: list[bool] = []


def _fire(state, where: str) -> bool:
    options = state.config.options(NanAtOptions)
    if options.where == where and state.step in options.steps and state.step not in _fired:
        _fired.add(state.step)
        return True
    return False


@hookimpl
def plait_config_schema():
    return NanAtOptions


@hookimpl
def plait_fit_start(state):
    _fired.clear()
    _before.clear()
    unchanged.clear()


@hookimpl
def plait_batch_start(state, batch):
    model = getattr(state.model, "module", state.model)
    if state.step in _before:  # the poisoned step was skipped: the same step is tried again
        before = _before.pop(state.step)
        unchanged.append(all(torch.equal(before[k], v) for k, v in model.state_dict().items()))
    if state.step in state.config.options(NanAtOptions).steps and state.step not in _fired:
        _before[state.step] = {k: v.clone() for k, v in model.state_dict().items()}
    if _fire(state, "input"):
        batch["inputs"]["image"]["image"].fill_(state.config.options(NanAtOptions).value)


@hookimpl
def plait_loss_terms(state, batch, outputs):
    if _fire(state, "loss"):
        return {"poison": outputs["logits"].sum() * state.config.options(NanAtOptions).value}
    return None
