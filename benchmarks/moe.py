"""Mixture of experts against a dense model on the wiki_lm byte-level language model.

    .venv/bin/python benchmarks/moe.py [--steps 1500] [--rounds 5] [--seeds 0 1 2]

Both models have the same active parameters: the MoE model's blocks hold 4 experts, each as
wide as the dense feed-forward, routed top-1 (capacity factor 1.25, Switch balancing loss).
They train the same number of steps with the same seed and data order, in this process
(plait's `train`, Ray Train's local mode), and are scored on the validation split, once per seed:
at this size one seed's perplexity moves by about 0.1 from another's (the initial weights and the
data order), more than the two models differ, so ``ppl_dense`` and ``ppl_moe`` are means over
``--seeds`` (each seed's are in ``ppl_by_seed``).
Throughput is forward+backward tokens/s of the two models on the same batches, measured
alternately in one process (`--rounds` rounds, median of the per-round ratios). The expert
load and the dropped fraction are the trained MoE's over the last 100 training steps
(max over layers of max/mean load; mean over layers of the dropped fraction), the worst seed's.

Last line: JSON {"ppl_dense", "ppl_moe", "throughput_vs_dense", "max_over_mean_load", "dropped_fraction", ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plait.core.runs import prepare
from plait.launch import ray_runner

LM = {"seq_len": 64, "dim": 128, "layers": 2, "heads": 4, "ffn": 512}
MOE = {"experts": 4, "top_k": 1, "capacity_factor": 1.25, "targets": ["transformers"], "aux_loss_weight": 0.01}


def raw_config(name: str, moe: bool, steps: int, runs_dir: str, seed: int = 0) -> dict:
    plugins = {"wiki_lm": dict(LM), **({"moe": dict(MOE)} if moe else {})}
    run = {"name": name, "runs_dir": runs_dir, "epochs": 1, "max_steps": steps, "batch_size": 32,
           "eval_batch_size": 128, "lr": 3e-3, "warmup_steps": 50, "log_every": 25, "seed": seed}
    return {"run": run, "scaling": {"num_workers": 0}, "plugins": plugins}


def train(name: str, moe: bool, steps: int, runs_dir: str, seed: int = 0) -> tuple[dict, list[dict]]:
    raw = raw_config(name, moe, steps, runs_dir, seed)
    config, _ = prepare(raw, f"benchmarks/moe.py ({name})")
    results = ray_runner.train(config, raw)
    rows = [json.loads(line) for line in (Path(runs_dir) / name / "metrics.jsonl").read_text().splitlines()]
    return results, [r for r in rows if r["split"] == "train"]


def throughput_ratio(rounds: int, runs_dir: str) -> tuple[float, float, float]:
    """(median MoE/dense ratio, dense tokens/s, MoE tokens/s) of forward+backward."""
    from plait.core.model import build_model

    models = {}
    for moe in (False, True):
        config, plugins = prepare(raw_config("speed", moe, 1, runs_dir), "benchmarks/moe.py")
        torch.manual_seed(0)
        models[moe] = build_model(plugins, config, ("text",), 256).train()
    generator = torch.Generator().manual_seed(0)
    batches = [{"inputs": {"text": {"ids": torch.randint(0, 256, (32, LM["seq_len"]), generator=generator)}}}
               for _ in range(10)]
    labels = [torch.randint(0, 256, (32 * LM["seq_len"],), generator=generator) for _ in batches]

    def tokens_per_s(model) -> float:
        started = time.perf_counter()
        for batch, label in zip(batches, labels, strict=True):
            logits = model(batch)["logits"]
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), label).backward()
        model.zero_grad(set_to_none=True)
        return len(batches) * 32 * LM["seq_len"] / (time.perf_counter() - started)

    for model in models.values():
        tokens_per_s(model)  # warm-up
    dense, sparse = [], []
    for _ in range(rounds):
        dense.append(tokens_per_s(models[False]))
        sparse.append(tokens_per_s(models[True]))
    ratio = statistics.median(s / d for d, s in zip(dense, sparse, strict=True))
    return ratio, statistics.median(dense), statistics.median(sparse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    perplexity: dict[str, list[float]] = {"dense": [], "moe": []}
    balance: list[tuple[float, float]] = []  # (max over mean load, dropped fraction) of each seed's MoE
    with tempfile.TemporaryDirectory() as runs_dir:
        ratio, dense_speed, moe_speed = throughput_ratio(args.rounds, runs_dir)
        print(f"forward+backward: dense {dense_speed:.0f} tokens/s, MoE {moe_speed:.0f} tokens/s", flush=True)
        for seed in args.seeds:
            dense, _ = train(f"dense-{seed}", False, args.steps, runs_dir, seed)
            moe, rows = train(f"moe-{seed}", True, args.steps, runs_dir, seed)
            perplexity["dense"].append(dense["val"]["perplexity"])
            perplexity["moe"].append(moe["val"]["perplexity"])
            balance.append(load_balance(rows, args.steps))
            print(f"seed {seed}: validation perplexity dense {perplexity['dense'][-1]:.3f}, "
                  f"MoE {perplexity['moe'][-1]:.3f}", flush=True)
    print(json.dumps({
        "ppl_dense": round(statistics.mean(perplexity["dense"]), 4),
        "ppl_moe": round(statistics.mean(perplexity["moe"]), 4),
        "throughput_vs_dense": round(ratio, 3), "max_over_mean_load": round(max(b[0] for b in balance), 3),
        "dropped_fraction": round(max(b[1] for b in balance), 4), "steps": args.steps, "seeds": args.seeds,
        "ppl_by_seed": {k: [round(v, 4) for v in vs] for k, vs in perplexity.items()},
        "tokens_per_step": 32 * LM["seq_len"], "moe_layers": LM["layers"],
    }))


def load_balance(rows: list[dict], steps: int) -> tuple[float, float]:
    """The trained MoE's max/mean load (the worst layer's) and dropped fraction (the layers' mean) over its
    last 100 steps."""
    last = [r for r in rows if r["step"] > steps - 100]
    layers = sorted({k.split("_")[0] for r in last for k in r if k.startswith("moe") and k[3:4].isdigit()})
    max_over_mean = max(statistics.mean(r[f"{layer}_max_over_mean_load"] for r in last) for layer in layers)
    dropped = statistics.mean(statistics.mean(r[f"{layer}_dropped"] for r in last) for layer in layers)
    return max_over_mean, dropped


if __name__ == "__main__":
    main()
