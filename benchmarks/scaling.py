"""Training throughput of the default model under plait and under a hand-written Ray Train loop, on 1 and 2
Ray Train CPU workers (one thread each).

    .venv/bin/python benchmarks/scaling.py [--steps 60] [--rounds 2]

The plain loop is what a user writes without plait, from Ray Train's guide: the same data set and model
(built by the same plugins), ``ray.train.torch.prepare_model`` (DDP), a ``DistributedSampler`` loader,
the same fused AdamW, learning rate and loss (the plugins' loss terms), and nothing else: no metrics rows,
progress, checkpoints or evaluation. All four configurations run in one Ray session, alternating, `rounds`
times each. samples/s is the median over 5-step windows after the first (start-up excluded); each figure is
the median over rounds, and each ratio the median of the rounds' own ratios (this machine's speed drifts
between rounds by more than the effects measured). Last line: JSON with ``plait_vs_plain_2`` (plait's
samples/s over the plain loop's at 2 workers), ``speedup_2_workers`` (plait's) and ``plain_speedup_2_workers``.

On a 2-core machine the two workers share the cores with Ray's own processes (GCS, raylet, Train V2's
controller, the driver), which stall both DDP ranks in the 2-worker run; the absolute speed-up needs 4 or
more free cores to mean anything. The ratio of plait to the plain loop is fair here: both pay the same.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 5


def config_for(workers: int, steps: int, runs_dir: str, name: str) -> tuple[Any, dict[str, Any]]:
    overrides = [f"scaling.num_workers={workers}", "scaling.resources_per_worker={CPU: 1}",
                 f"run.max_steps={steps}", f"run.log_every={WINDOW}", f"run.runs_dir={runs_dir}", f"run.name={name}"]
    raw = load_config(ROOT / "plugins.yaml", overrides)
    raw["plugins"].pop("progress", None)
    raw["plugins"].pop("curves", None)
    config, _ = prepare(raw, "plugins.yaml")
    return config, raw


def plait_speed(workers: int, steps: int, runs_dir: str, tag: str) -> float:
    config, raw = config_for(workers, steps, runs_dir, f"scaling-{workers}-{tag}")
    ray_runner.train(config, raw)
    rows = [json.loads(line) for line in (Path(runs_dir) / config.run.name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["samples_per_s"] for r in rows if r["split"] == "train"][1:])


def plain_loop(loop_config: dict[str, Any]) -> None:
    """A hand-written Ray Train worker: what the guide shows, around the plugins' data, model and loss."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from plait.core.data import build_dataset, move
    from plait.core.model import build_model
    from plait.core.runs import prepare as prepare_run
    from plait.core.state import RunState
    from plait.core.step import loss_terms

    torch.set_num_threads(1)
    config, plugins = prepare_run(loop_config["raw"], "plugins.yaml")
    torch.manual_seed(config.run.seed)
    dataset = build_dataset(plugins, config, "train")
    assert dataset is not None
    model = ray.train.torch.prepare_model(build_model(plugins, config, dataset.modalities, len(dataset.classes)))
    context = ray.train.get_context()
    sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=context.get_world_size(),
                                                          rank=context.get_world_rank(), seed=config.run.seed)
    loader = DataLoader(dataset, batch_size=config.run.batch_size, sampler=sampler, collate_fn=dataset.collate_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.run.lr, weight_decay=config.run.weight_decay,
                                  fused=True)
    state = RunState(config=config, plugins=plugins, run_dir=Path(loop_config["runs_dir"]),
                     device=torch.device("cpu"), model=model, optimizer=optimizer)
    speeds, step, started, epoch = [], 0, time.perf_counter(), 0
    model.train()
    while step < config.run.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = move(batch, state.device)
            loss = torch.stack([t.float() for t in loss_terms(state, batch, model(batch)).values()]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.run.grad_clip)
            optimizer.step()
            step += 1
            if step % WINDOW == 0:
                now = time.perf_counter()
                speeds.append(WINDOW * config.run.batch_size * context.get_world_size() / (now - started))
                started = now
            if step >= config.run.max_steps:
                break
        epoch += 1
    if context.get_world_rank() == 0:  # Train V2 keeps reported metrics only with a checkpoint: a file
        Path(loop_config["out"]).write_text(json.dumps(speeds))


def plain_speed(workers: int, steps: int, runs_dir: str, tag: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config, raw = config_for(workers, steps, runs_dir, f"plain-{workers}-{tag}")
    out = Path(runs_dir) / f"{config.run.name}.json"
    trainer = TorchTrainer(plain_loop, train_loop_config={"raw": raw, "runs_dir": runs_dir, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=config.run.name, storage_path=runs_dir))
    trainer.fit()
    return statistics.median(json.loads(out.read_text())[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ray_runner.connect(None, verbose=False)
    results: dict[tuple[str, int], list[float]] = {(kind, n): [] for kind in ("plait", "plain") for n in (1, 2)}
    with tempfile.TemporaryDirectory() as runs_dir:
        for round_ in range(args.rounds):
            for workers in (1, 2):
                for kind, measure in (("plait", plait_speed), ("plain", plain_speed)):
                    speed = measure(workers, args.steps, runs_dir, str(round_))
                    results[kind, workers].append(speed)
                    print(f"round {round_ + 1}: {kind}, {workers} worker(s): {speed:.1f} samples/s", flush=True)

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> float:
        return round(statistics.median(x / y for x, y in zip(results[a], results[b], strict=True)), 3)

    speeds = {f"{kind}_samples_per_s_{n}": round(statistics.median(v), 1) for (kind, n), v in results.items()}
    print(json.dumps({**speeds,
                      "plait_vs_plain_2": ratio(("plait", 2), ("plain", 2)),
                      "plait_vs_plain_1": ratio(("plait", 1), ("plain", 1)),
                      "speedup_2_workers": ratio(("plait", 2), ("plait", 1)),
                      "plain_speedup_2_workers": ratio(("plain", 2), ("plain", 1))}))


if __name__ == "__main__":
    main()
