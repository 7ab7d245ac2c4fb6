"""A plugin for ``benchmarks/parallel.py``: the bytes of each worker's own parameters (a split parameter's
local part) and of its experts' (MoE layers' ``w1``, ``b1``, ``w2``, ``b2``), counted from the tensors at the
start of training, in ``parallel-probe-<rank>.json`` in the run folder."""
from __future__ import annotations

import json
import re

from plait.core.hookspecs import hookimpl

EXPERT = re.compile(r"\.moe\.(w1|b1|w2|b2)$")


@hookimpl
def plait_fit_start(state):
    counted = {"parameters": 0, "experts": 0}
    for name, param in state.model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        size = local.numel() * local.element_size()
        counted["parameters"] += size
        if EXPERT.search(name):
            counted["experts"] += size
    (state.run_dir / f"parallel-probe-{state.rank}.json").write_text(json.dumps(counted))
