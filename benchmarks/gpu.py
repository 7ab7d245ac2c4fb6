"""The default model on one GPU in bf16, through Ray Train: samples/s and peak GPU memory.

    .venv/bin/python benchmarks/gpu.py [--epochs 2] [--workers 1]

Run it where a GPU is (on this project's lent device machine); without one it stops at once
with plait's "no GPU in the cluster" error. Last line: JSON {"samples_per_s": ...,
"peak_gpu_memory_mb": ..., "test_accuracy": ..., "train_seconds": ...}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs_dir:
        overrides = [f"scaling.num_workers={args.workers}", "scaling.use_gpu=true", "run.precision=bf16",
                     f"run.epochs={args.epochs}", f"run.runs_dir={runs_dir}", "run.name=gpu-bf16"]
        raw = load_config(ROOT / "plugins.yaml", overrides)
        raw["plugins"].pop("curves", None)
        config, _ = prepare(raw, "plugins.yaml")
        results = ray_runner.train(config, raw)
    print(json.dumps({"samples_per_s": results["samples_per_s"],
                      "peak_gpu_memory_mb": results.get("peak_gpu_memory_mb"),
                      "test_accuracy": results["test"]["fused"]["accuracy"],
                      "train_seconds": results["train_seconds"]}))


if __name__ == "__main__":
    main()
