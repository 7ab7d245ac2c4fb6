"""The profile plugin: its Chrome trace parses as JSON and names every hook call and recorded step."""
from __future__ import annotations

import json

import pytest

from plait.testing import train_steps

pytestmark = pytest.mark.timeout(300)


def test_the_profiler_trace_parses_and_names_each_hook_and_step(tmp_path):
    state = train_steps(tmp_path, {"profile": {"start_step": 1, "steps": 2}}, steps=4)
    folder = state.run_dir / "profile"
    trace = json.loads((folder / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"plait step 2", "plait step 3"} <= names and "plait step 1" not in names and "plait step 4" not in names
    assert {"fusion.plait_loss_terms", "text_encoder.plait_count_tokens"} <= names
    assert "aten::mm" in names or "aten::addmm" in names
    table = (folder / "top_ops_rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert state.plugins.profiled is False  # no more ranges once it stopped


def test_a_run_ending_inside_the_profiled_steps_still_writes_its_trace(tmp_path):
    state = train_steps(tmp_path, {"profile": {"start_step": 1, "steps": 10}}, steps=3)
    names = {e.get("name") for e in json.loads((state.run_dir / "profile" / "trace_rank0.json").read_text())
             ["traceEvents"]}
    assert {"plait step 2", "plait step 3"} <= names
