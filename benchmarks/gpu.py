"""On one GPU in bf16, through Ray Train: samples/s, peak GPU memory and, for the large config, MFU.

    .venv/bin/python benchmarks/gpu.py [--epochs 2] [--workers 1]            # the default model (plugins.yaml)
    .venv/bin/python benchmarks/gpu.py --large [--steps 60] [--batch-size 32] # examples/large, compiled, FSDP

Run it where a GPU is (on this project's lent device machine); without one it stops at once with plait's
"no GPU in the cluster" error. ``--large`` trains ``examples/large/large.yaml`` (~110 M parameters) in bf16
with each block compiled and checkpointed. Its model FLOPs per sample are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward, loss and backward of a real batch, on the meta device),
and MFU is samples/s x FLOPs per sample over the GPU's dense bf16 peak from its spec sheet (``PEAK_TFLOPS``).
Last line: JSON {"samples_per_s": ..., "peak_gpu_memory_mb": ..., ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]
#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' spec sheets, by a name torch reports.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def flops_per_sample(config: Any, plugins: Any) -> float:
    """Forward + loss + backward FLOPs of one training batch, per sample, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from plait.launch.plan import meta_step, training_loss

    state, batch = meta_step(config, plugins)
    with FlopCounterMode(display=False) as counter:
        _, loss = training_loss(state, batch)
        loss.backward()
    return counter.get_total_flops() / config.run.batch_size


def peak_tflops() -> float | None:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--large", action="store_true", help="examples/large/large.yaml, compiled, with MFU")
    parser.add_argument("--steps", type=int, default=60, help="--large: optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="--large: per worker")
    args = parser.parse_args()
    source = ROOT / ("examples/large/large.yaml" if args.large else "plugins.yaml")
    with tempfile.TemporaryDirectory() as runs_dir:
        overrides = [f"scaling.num_workers={args.workers}", "scaling.use_gpu=true", "run.precision=bf16",
                     f"run.runs_dir={runs_dir}", "run.name=gpu-bf16"]
        overrides += ([f"run.max_steps={args.steps}", f"run.batch_size={args.batch_size}", "run.checkpoint_every=null",
                       "plugins.wiki_lm.max_articles=3000", "scaling.fsdp.param_dtype=bfloat16"]
                      if args.large else [f"run.epochs={args.epochs}"])
        raw = load_config(source, overrides)
        raw["plugins"].pop("curves", None)
        config, plugins = prepare(raw, str(source))
        results = ray_runner.train(config, raw)
        rows = [json.loads(line) for line in (Path(runs_dir) / "gpu-bf16" / "metrics.jsonl").read_text().splitlines()]
    # the median logged window after the first, which holds the first step (and compilation)
    speeds = [r["samples_per_s"] for r in rows if r["split"] == "train"]
    steady = statistics.median(speeds[1:]) if len(speeds) > 1 else results["samples_per_s"]
    figures: dict[str, Any] = {"samples_per_s": round(steady, 1), "samples_per_s_whole_run": results["samples_per_s"],
                               "peak_gpu_memory_mb": results.get("peak_gpu_memory_mb"),
                               "train_seconds": results["train_seconds"]}
    if args.large:
        per_sample = flops_per_sample(config, plugins)
        peak = peak_tflops()
        achieved = steady * per_sample / 1e12
        figures.update({"gflops_per_sample": round(per_sample / 1e9, 2), "achieved_tflops": round(achieved, 2),
                        "peak_tflops": peak, "mfu": round(achieved / (peak * args.workers), 4) if peak else None,
                        "val_perplexity": results.get("val", {}).get("perplexity")})
    else:
        figures["test_accuracy"] = results["test"]["fused"]["accuracy"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
