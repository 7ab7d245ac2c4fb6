"""What a teacher on its own Ray actor costs per step, against the teacher in the student's worker.

    .venv/bin/python benchmarks/distill_workers.py [--steps 60]

On one local Ray of this machine's CPUs: the default model (plugins.yaml, trained a few steps: its size is what
matters here) teaches benchmarks/distill.py's student, a tenth its size, on 1 Ray Train worker of 1 CPU. Three
runs of ``--steps`` optimizer steps, in turn: the student alone (no distillation), the teacher in the worker
(``distill: {teacher: ...}``) and the teacher in 1 actor of 1 CPU (``teacher_workers: 1``), which gets each batch
one batch ahead. Step time is the median over the training rows (every 5 steps) after the first, from their
samples/s; ``teacher_wait_ms`` is the actor run's mean wait per batch.

Last line: JSON {"step_ms_alone", "step_ms_live", "step_ms_workers", "teacher_wait_ms", "workers_over_live"
(step time with the actor over step time with the teacher in the worker), "workers_over_alone", "steps", "cpus"}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from distill import KD, student_config  # noqa: E402 - the same student as benchmarks/distill.py


def run(raw: dict, name: str, runs_dir: str, steps: int, workers: int) -> list[dict]:
    """Train ``raw`` for ``steps`` steps; return its training rows."""
    raw = copy.deepcopy(raw)
    raw["run"].update(name=name, runs_dir=runs_dir, max_steps=steps, log_every=5)
    raw.setdefault("scaling", {}).update(num_workers=workers, resources_per_worker={"CPU": 1})
    for noisy in ("progress", "curves"):
        raw["plugins"].pop(noisy, None)
    config, _ = prepare(raw, f"benchmarks/distill_workers.py ({name})")
    ray_runner.train(config, raw)
    rows = [json.loads(line) for line in (Path(runs_dir) / name / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("split") == "train"]


def step_ms(rows: list[dict], batch_size: int) -> float:
    return statistics.median(1000 * batch_size / row["samples_per_s"] for row in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    base = load_config(ROOT / "plugins.yaml")
    batch_size = base["run"].get("batch_size", 32)
    with tempfile.TemporaryDirectory() as runs_dir:
        run(base, "teacher", runs_dir, 2, 0)
        teacher = str(Path(runs_dir) / "teacher")
        alone = run(student_config(base, None), "alone", runs_dir, args.steps, 1)
        live = run(student_config(base, teacher), "live", runs_dir, args.steps, 1)
        remote_raw = student_config(base, teacher)
        remote_raw["plugins"]["distill"].update(teacher_workers=1, teacher_resources={"CPU": 1})
        remote = run(remote_raw, "workers", runs_dir, args.steps, 1)
    figures = {name: step_ms(rows, batch_size) for name, rows in (("alone", alone), ("live", live),
                                                                   ("workers", remote))}
    print(json.dumps({
        "step_ms_alone": round(figures["alone"], 1), "step_ms_live": round(figures["live"], 1),
        "step_ms_workers": round(figures["workers"], 1),
        "teacher_wait_ms": round(statistics.mean(row["teacher_wait_ms"] for row in remote[1:]), 2),
        "workers_over_live": round(figures["workers"] / figures["live"], 3),
        "workers_over_alone": round(figures["workers"] / figures["alone"], 3),
        "steps": args.steps, "cpus": os.cpu_count(), "kd": KD,
    }))


if __name__ == "__main__":
    main()
