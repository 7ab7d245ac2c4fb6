"""Training throughput of the default model on 1 vs 2 Ray Train CPU workers (one thread each).

    .venv/bin/python benchmarks/scaling.py [--steps 60] [--rounds 2]

Both worker counts run in one Ray session (started as `plait train` starts it), alternating,
`rounds` times each; samples/s is the median over the logged training windows after the first
(start-up and evaluation excluded), each count's figure is the median over rounds, and the
speed-up is the median of the rounds' own ratios (this machine's speed drifts between rounds
by more than the effects measured). Last line: JSON
{"samples_per_s_1": ..., "samples_per_s_2": ..., "speedup_2_workers": ...}.

On a 2-core machine the two workers share the cores with Ray's own processes (GCS, raylet,
Train V2's controller and helper actors, the driver): about 1.5 CPU-seconds in every 15 s of
training, which the 1-worker run absorbs on its idle core and which stalls both DDP ranks in
the 2-worker run. The same `fit` under plain torch.distributed (no Ray) measured 1.75-1.9x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]


def measure(workers: int, steps: int, runs_dir: str, tag: str) -> float:
    overrides = [f"scaling.num_workers={workers}", "scaling.resources_per_worker={CPU: 1}",
                 f"run.max_steps={steps}", "run.log_every=5", f"run.runs_dir={runs_dir}",
                 f"run.name=scaling-{workers}-{tag}"]
    raw = load_config(ROOT / "plugins.yaml", overrides)
    raw["plugins"].pop("progress", None)
    raw["plugins"].pop("curves", None)
    config, _ = prepare(raw, "plugins.yaml")
    ray_runner.train(config, raw)
    rows = [json.loads(line) for line in (Path(runs_dir) / config.run.name / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if r["split"] == "train"][1:]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ray_runner.connect(None, verbose=False)
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as runs_dir:
        for round_ in range(args.rounds):
            for workers in (1, 2):
                speed = measure(workers, args.steps, runs_dir, str(round_))
                results[workers].append(speed)
                print(f"round {round_ + 1}: {workers} worker(s): {speed:.1f} samples/s", flush=True)
    one, two = statistics.median(results[1]), statistics.median(results[2])
    speedup = statistics.median(b / a for a, b in zip(results[1], results[2], strict=True))
    print(json.dumps({"samples_per_s_1": round(one, 1), "samples_per_s_2": round(two, 1),
                      "speedup_2_workers": round(speedup, 3)}))


if __name__ == "__main__":
    main()
