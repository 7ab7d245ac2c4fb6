"""Memory and speed of the large config (``examples/large/large.yaml``, ~110 M parameters) on 2 Ray Train CPU
workers, under five strategies, side by side in one Ray session, with ``plait plan``'s estimate of each:

    ddp               DDP: every worker holds the whole model, its gradients and AdamW's moments
    fsdp_modules      FSDP2, units per encoder and fusion (plait's former default); wiki_lm has neither, so the
                      whole model is one unit, gathered whole for the forward and backward
    fsdp_blocks       FSDP2, each transformer block a unit
    fsdp_blocks_ac    + activation checkpointing of every block
    fsdp_blocks_ac_compile  + each block compiled with torch.compile

    .venv/bin/python benchmarks/memory.py [--steps 14] [--articles 2000] [--dim 768 --layers 12 ...]

About 40 minutes at the full size. Each worker measures itself (``benchmarks/memory_probe.py``, a plugin):
its own parameter, gradient and optimizer bytes counted from its tensors, and its resident set per step. The
workers run with glibc's mmap threshold fixed at 128 KiB, so a freed tensor's pages go back to the system and
the resident set follows the live tensors. Figures per variant (the larger of the two workers):

- ``state_mib``: parameters + gradients + optimizer state held by the worker;
- ``activation_peak_mib``: the peak over a step's forward and backward above the step's start, less the
  gradients the backward allocates (what autograd keeps, and recomputes, for the backward);
- ``peak_mib``: the peak over a step above the worker's memory before the model was built (imports and data);
  on a GPU this is what ``max_memory_allocated`` measures;
- ``samples_per_s``: the median over the logged training windows after the first (which holds the first step,
  and compilation);
- ``plan_mib``: ``plait plan``'s per-worker total, and ``plan_error``: |plan - peak| / peak.

Steps after the second are measured (the first allocates the optimizer's state). Last line: JSON with every
variant and ``fsdp_block_state_vs_ddp``, ``ac_activation_reduction``, ``ac_step_time_ratio``,
``compile_speedup``, ``plan_max_error``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "large" / "large.yaml"
MIB = 2**20

VARIANTS: dict[str, list[str]] = {
    "ddp": ["scaling.strategy=ddp", "run.activation_checkpointing=none", "run.compile=false"],
    "fsdp_modules": ["scaling.fsdp.units=modules", "run.activation_checkpointing=none", "run.compile=false"],
    "fsdp_blocks": ["run.activation_checkpointing=none", "run.compile=false"],
    "fsdp_blocks_ac": ["run.activation_checkpointing=full", "run.compile=false"],
    "fsdp_blocks_ac_compile": ["run.activation_checkpointing=full", "run.compile=true"],
}


def overrides(args: argparse.Namespace, runs_dir: str, variant: str) -> list[str]:
    model = (f"plugins.wiki_lm={{tokenizer: wordpiece, seq_len: {args.seq_len}, dim: {args.dim}, layers: "
             f"{args.layers}, heads: {args.heads}, ffn: {4 * args.dim}, dropout: 0.1, max_articles: {args.articles}}}")
    return [model, *VARIANTS[variant], f"run.max_steps={args.steps}", "run.log_every=2", f"run.runs_dir={runs_dir}",
            f"run.name={variant}", f"run.batch_size={args.batch_size}", "run.checkpoint_every=null",
            "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}"]


def measured(run_dir: Path) -> dict[str, Any]:
    """The larger worker's figures, from the probe's records and the run's metrics."""
    workers = []
    for path in sorted(run_dir.glob("memory-probe-*.json")):
        record = json.loads(path.read_text())
        steady = [s for s in record["steps"] if s["step"] >= 3 and "peak_step" in s]
        if not steady:
            raise SystemExit(f"{path}: no step after the second was measured; give --steps 4 or more")
        grads = 0 if record["gradients_are_bucket_views"] else max(s["gradients"] for s in steady)
        workers.append({
            "state": max(s["parameters"] + s["gradients"] + s["optimizer"] for s in steady),
            "activation_peak": max(s["peak_forward_backward"] - s["rss_start"] for s in steady) - grads,
            "peak": max(s["peak_step"] for s in steady) - record["rss_before_model"],
        })
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if r["split"] == "train"]
    worst = {key: max(w[key] for w in workers) for key in ("state", "activation_peak", "peak")}
    return {**worst, "samples_per_s": statistics.median(speeds[1:]), "first_window_samples_per_s": speeds[0],
            "peak_per_worker": [w["peak"] for w in workers]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--articles", type=int, default=2000, help="wiki articles read (all splits)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    # inherited by the Ray workers, which the local Ray session started here starts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    sys.path.insert(0, str(ROOT / "benchmarks"))

    from plait.core.config import load_config
    from plait.core.runs import prepare
    from plait.launch import ray_runner
    from plait.launch.plan import plan

    ray_runner.connect(None, verbose=False)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for variant in args.only:
            raw = load_config(CONFIG, overrides(args, runs_dir, variant))
            raw["plugins"] = {k: v for k, v in raw["plugins"].items() if k not in ("progress", "curves")}
            config, plugins = prepare(raw, str(CONFIG))
            estimate = plan(config, plugins)
            raw["plugins"]["memory_probe"] = {}
            config, _ = prepare(raw, str(CONFIG))
            ray_runner.train(config, raw)
            figures = measured(Path(runs_dir) / variant)
            plan_total = estimate["per_worker_bytes"]["total"]
            results[variant] = {
                "state_mib": round(figures["state"] / MIB, 1),
                "activation_peak_mib": round(figures["activation_peak"] / MIB, 1),
                "peak_mib": round(figures["peak"] / MIB, 1),
                "samples_per_s": round(figures["samples_per_s"], 2),
                "first_window_samples_per_s": round(figures["first_window_samples_per_s"], 2),
                "plan_mib": round(plan_total / MIB, 1),
                "plan_activations_mib": round(estimate["per_worker_bytes"]["activations"] / MIB, 1),
                "plan_error": round(max(abs(plan_total - p) / p for p in figures["peak_per_worker"]), 3),
            }
            print(variant, json.dumps(results[variant]), flush=True)
    summary: dict[str, Any] = {"parameters_m": round(estimate["parameters"] / 1e6, 1), "variants": results}

    def ratio(key: str, top: str, bottom: str) -> float | None:
        if top in results and bottom in results:
            return round(results[top][key] / results[bottom][key], 3)
        return None

    summary["fsdp_block_state_vs_ddp"] = ratio("state_mib", "fsdp_blocks", "ddp")
    summary["ac_activation_reduction"] = ratio("activation_peak_mib", "fsdp_blocks", "fsdp_blocks_ac")
    summary["ac_step_time_ratio"] = ratio("samples_per_s", "fsdp_blocks", "fsdp_blocks_ac")
    summary["compile_speedup"] = ratio("samples_per_s", "fsdp_blocks_ac_compile", "fsdp_blocks_ac")
    summary["plan_max_error"] = max(r["plan_error"] for r in results.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
