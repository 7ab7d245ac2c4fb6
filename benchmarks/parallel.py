"""Data, tensor and expert parallelism side by side on 2 Ray workers, in one run.

    .venv/bin/python benchmarks/parallel.py [--steps 120]

The model is ``wiki_lm``'s byte-level causal language model (dim 256, 2 blocks, 8 heads, ffn 1024,
sequence 64, batch 16 per data replica). Four runs train it through plait's Ray runner, one after the other
in one Ray session:

- ``dp``: DDP, each worker holds every weight and reads its own batches;
- ``tp``: tensor_parallel 2, the two workers split each block's attention heads and feed-forward units and
  read the same batches (one data replica);
- ``dp_moe``: the same model with 4 experts per block (top-1, capacity factor 1.25), under DDP;
- ``ep``: that MoE model with expert_parallel 2, each worker holding 2 of each layer's 4 experts.

Per run: samples/s in steady state (every data replica's samples; the median of the 10-step windows that
``metrics.jsonl`` logs, the first one, with the process group's and the allocator's warm-up, left out) and
each worker's parameter bytes, counted from its tensors (``parallel_probe.py``). TP's speed is per data replica,
so it is compared with DDP's at the same global batch: DDP's two workers read 2 x 16 samples a step, TP's
group 16; ``tp_vs_dp_speed`` is TP's samples/s over DDP's.

Last line: JSON with ``tp_param_fraction``, ``ep_expert_param_fraction``, ``ep_vs_dp_speed``,
``tp_vs_dp_speed`` and the runs' figures.
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
LM = {"seq_len": 64, "dim": 256, "layers": 2, "heads": 8, "ffn": 1024, "dropout": 0.0}
MOE = {"experts": 4, "top_k": 1, "capacity_factor": 1.25, "targets": ["transformers"]}
RUNS: dict[str, dict[str, Any]] = {
    "dp": {"moe": False, "scaling": {}},
    "tp": {"moe": False, "scaling": {"tensor_parallel": 2}},
    "dp_moe": {"moe": True, "scaling": {}},
    "ep": {"moe": True, "scaling": {"expert_parallel": 2}},
}


def raw_config(name: str, steps: int, runs_dir: str) -> dict[str, Any]:
    spec = RUNS[name]
    plugins: dict[str, Any] = {"wiki_lm": dict(LM), "parallel_probe": {}}
    if spec["moe"]:
        plugins["moe"] = dict(MOE)
    run = {"name": name, "runs_dir": runs_dir, "epochs": 1, "max_steps": steps, "batch_size": 16,
           "eval_batch_size": 64, "lr": 1e-3, "warmup_steps": 5, "log_every": 10, "seed": 0}
    return {"run": run, "scaling": {"num_workers": 2, **spec["scaling"]}, "plugins": plugins}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    # the Ray workers, which the local Ray session started here starts, import the probe plugin
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT / "benchmarks"))

    from plait.core.runs import prepare
    from plait.launch import ray_runner

    ray_runner.connect(None, verbose=False)
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for name in RUNS:
            raw = raw_config(name, args.steps, runs_dir)
            config, _ = prepare(raw, f"benchmarks/parallel.py ({name})")
            results = ray_runner.train(config, raw)
            probes = [json.loads((Path(runs_dir) / name / f"parallel-probe-{rank}.json").read_text())
                      for rank in range(2)]
            rows = [json.loads(line) for line in (Path(runs_dir) / name / "metrics.jsonl").read_text().splitlines()]
            windows = [r["samples_per_s"] for r in rows if r["split"] == "train"][1:]
            figures[name] = {"samples_per_s": round(statistics.median(windows), 1),
                             "parameter_mib_per_worker": round(max(p["parameters"] for p in probes) / 2**20, 3),
                             "expert_mib_per_worker": round(max(p["experts"] for p in probes) / 2**20, 3),
                             "val_loss": round(results["val"]["loss"], 4)}
            print(name, json.dumps(figures[name]), flush=True)
    dp, tp, dp_moe, ep = (figures[name] for name in RUNS)
    print(json.dumps({
        "tp_param_fraction": round(tp["parameter_mib_per_worker"] / dp["parameter_mib_per_worker"], 3),
        "ep_expert_param_fraction": round(ep["expert_mib_per_worker"] / dp_moe["expert_mib_per_worker"], 3),
        "ep_param_fraction": round(ep["parameter_mib_per_worker"] / dp_moe["parameter_mib_per_worker"], 3),
        "ep_vs_dp_speed": round(ep["samples_per_s"] / dp_moe["samples_per_s"], 3),
        "tp_vs_dp_speed": round(tp["samples_per_s"] / dp["samples_per_s"], 3),
        "steps": args.steps, "runs": figures,
    }))


if __name__ == "__main__":
    main()
