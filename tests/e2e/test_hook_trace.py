"""Real runs traced hook by hook (the ``trace`` test plugin) against the drawing of the loop in
``plait.core.hookspecs``' docstring: the drawing is parsed into a pattern that a run's calls must
match in full. One run in this process has gradient accumulation, a skipped non-finite step and
a resume in the middle of an epoch; another runs on 2 Ray Train workers."""
from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import PLUGINS_FOR_TESTS, TINY_PLUGINS

from plait.core import hookspecs
from plait.core.config import load_config
from plait.core.loop import fit
from plait.core.runs import load, prepare
from plait.launch import ray_runner

pytestmark = pytest.mark.slow


def drawing() -> list[str]:
    """The lines of the loop's drawing, as the hookspecs' docstring has them."""
    lines = inspect.cleandoc(hookspecs.__doc__ or "").splitlines()
    start = lines.index(".. code-block:: text") + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return [line[4:] for line in block if line.strip()]


def pattern(lines: list[str], main: bool) -> str:
    """A regular expression over 'hook[:split] ' tokens: ``for`` repeats its block (any number of
    times), ``if`` makes it optional, other lines ending in ':' group theirs; a hook line is one
    call; '(...)' lines are comments. Without ``main``, the hooks of the main process are left out."""

    def block(start: int, indent: int) -> tuple[str, int]:
        out, i = [], start
        while i < len(lines):
            line = lines[i]
            depth = len(line) - len(line.lstrip())
            if depth < indent:
                break
            code = re.split(r"\s{2,}", line.strip())[0]
            i += 1
            if code.startswith("("):
                continue
            if code.startswith("plait_"):
                name = re.match(r"plait_\w+", code).group(0)
                split = re.search(r'split="(\w+)"', code)
                if main or "main process only" not in line:
                    out.append(re.escape(f"{name}:{split.group(1)} " if split else f"{name} "))
                continue
            inner, i = block(i, depth + 4)
            out.append(f"(?:{inner})*" if code.startswith("for ") else f"(?:{inner})?" if code.startswith("if ")
                       else inner)
        return "".join(out), i

    assert lines[0] == "fit(config, plugins):"
    return block(1, 4)[0]


def traced(path: Path) -> list[str]:
    return [f"{c['hook']}:{c['split']}" if c["split"] else c["hook"] for c in map(json.loads, path.open())]


def test_the_drawing_reads_as_a_pattern_of_every_hook_fit_calls():
    lines = drawing()
    drawn = {re.match(r"\s*(plait_\w+)", line).group(1) for line in lines if re.match(r"\s*plait_", line)}
    outside = {"plait_config_schema", "plait_teacher", "plait_compress", "plait_export_model", "plait_runtime_env",
               "plait_register_commands"}
    assert drawn == {n for n in dir(hookspecs) if n.startswith("plait_")} - outside
    assert re.fullmatch(pattern(lines, main=True), "plait_build_dataset ") is None  # not a pattern of anything


def test_a_run_with_accumulation_a_skipped_step_and_a_resume_follows_the_drawing(tmp_path, write_config):
    trace = tmp_path / "trace"
    plugins = {"trace": {"path": str(trace)}, **TINY_PLUGINS, "nan_at": {"steps": [1]}}
    settings = {"name": "traced", "epochs": 2, "grad_accumulation": 2, "log_every": 1, "checkpoint_every": 1}
    stopped = fit(*load(write_config(plugins, max_steps=4, **settings)))
    first = traced(Path(f"{trace}.rank0.jsonl"))
    Path(f"{trace}.rank0.jsonl").rename(tmp_path / "first.jsonl")
    resumed = fit(*load(write_config(plugins, **settings)))
    second = traced(Path(f"{trace}.rank0.jsonl"))

    drawn = pattern(drawing(), main=True)
    for calls in (first, second):
        assert re.fullmatch(drawn, "".join(f"{c} " for c in calls)), calls
    # and the pattern tells a wrong order apart: batch_end before the step's after_backward
    position = first.index("plait_after_backward")
    swapped = [*first[:position], "plait_batch_end", "plait_after_backward", *first[position + 1:]]
    assert not re.fullmatch(drawn, "".join(f"{c} " for c in swapped))
    assert not re.fullmatch(pattern(drawing(), main=False), "".join(f"{c} " for c in first))  # rank 0 logs
    # 6 batches an epoch, 2 a step; step 1's first try is skipped: steps 0, 1 in epoch 0; 2, 3 in epoch 1
    assert stopped.step == 4 and stopped.nonfinite_steps == 1
    assert first.count("plait_batch_start") == 5 and first.count("plait_batch_end") == 4
    assert first.count("plait_loss_terms") == 10 and first.count("plait_after_backward") == 5
    # every batch is shown once, one ahead: the 6 of epoch 0, and in epoch 1 the 4 trained and the one after
    assert first.count("plait_batch_loaded") == 11
    assert "plait_load_state_dict" not in first and second.index("plait_load_state_dict") < second.index(
        "plait_fit_start")
    # the resume starts after the 4 batches of epoch 1 it had done: one step, then the end of the epoch
    assert resumed.step == 5 and second.count("plait_batch_start") == 1 and second.count("plait_epoch_start") == 1
    assert second.count("plait_batch_loaded") == 2  # the epoch's last two batches, and nothing it had trained on
    assert second.count("plait_log_metrics:train") == 1 and second.count("plait_eval_metrics:val") == 1
    # the test split: fused, then each of the 3 modalities alone
    assert second.count("plait_eval_metrics:test") == 4 and resumed.metrics["test"]["fused"]["modalities_seen"] == 3
    assert all(resumed.metrics["test"][m]["modalities_seen"] == 1 for m in resumed.modalities)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(PLUGINS_FOR_TESTS)}})
    yield
    ray.shutdown()


def test_two_ray_workers_each_follow_the_drawing(tmp_path, write_config, ray_session):
    trace = tmp_path / "trace"
    path = write_config({"trace": {"path": str(trace)}, **TINY_PLUGINS}, name="traced-ray", grad_accumulation=2,
                        checkpoint_every=1)
    raw = load_config(path, ["scaling.num_workers=2"])
    results = ray_runner.train(prepare(raw, str(path))[0], raw)
    assert results["world_size"] == 2
    for rank in (0, 1):
        calls = traced(Path(f"{trace}.rank{rank}.jsonl"))
        assert re.fullmatch(pattern(drawing(), main=rank == 0), "".join(f"{c} " for c in calls)), (rank, calls)
        assert calls.count("plait_batch_end") == results["steps"]
        assert ("plait_log_metrics:train" in calls) == (rank == 0)  # the main process alone logs
