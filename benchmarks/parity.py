"""Speed and memory parity: plait against a hand-written PyTorch loop and PyTorch Lightning.

    .venv/bin/python benchmarks/parity.py [--steps 80] [--warmup 10] [--rounds 5] [--variants plait,plait_mlflow]

One model and data set for all three: plugins.yaml's fusion model on spoken_digits (clips synthesized
once and cached), batches from the same DataLoader (plait's data set with the augment plugin's sample
transforms). Each trains `--steps` optimizer steps (AdamW fused, lr 2e-3, gradients clipped at 1.0,
the fusion plugin's loss: cross-entropy plus 0.1 x the contrastive term) in its own process:
(a) a plain loop, (b) plait in-process (`core.loop.fit`, the default plugin set: progress bar, curves,
metrics.jsonl every 10 steps), (c) a LightningModule with Lightning's Trainer (progress bar on,
no logger, no checkpoints), (d) plait with the mlflow plugin as well (MLflow's default SQLite store in
the runs folder, every row logged through its asynchronous queue). Processes alternate, round after
round; samples/s counts the steps after `--warmup`; a ratio is plait's samples/s over the other's
within a round, and the figure is the median over rounds. Peak RSS: the process's maximum resident
set (ru_maxrss).

Time to first step: `plait train plugins.yaml scaling.num_workers=0` (the CLI, in-process) from the
command's start to the end of its first optimizer step, run 3 times; "cold" is the first run after
this benchmark dropped the OS page cache (when it may; else the first run), "warm" the median of the others.

`--variants` runs only some of them (more rounds of fewer variants: a small cost needs many rounds
on a noisy machine); the ratios of the ones left out are null.

Last line: JSON {"plait_vs_plain", "plait_vs_lightning", "mlflow_step_cost" (plait's samples/s over
plait-with-mlflow's, minus 1), "peak_rss_mb_<variant>", "samples_per_s", "first_step_s_cold",
"first_step_s_warm"}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "plait", "lightning", "plait_mlflow")


def _config(steps: int, runs_dir: str, mlflow: bool = False):
    from plait.core.config import load_config
    from plait.core.runs import prepare

    raw = load_config(ROOT / "plugins.yaml")
    raw["run"].update(max_steps=steps, runs_dir=runs_dir, name="parity", log_every=10)
    raw["scaling"] = {"num_workers": 0}
    raw["plugins"]["parity_clock"] = {}
    if mlflow:
        raw["plugins"]["mlflow"] = {}
    return prepare(raw, "benchmarks/parity.py")


def _setup(steps: int, runs_dir: str):
    """(config, model, train loader) exactly as plait builds them."""
    import torch

    from plait.core.data import build_dataset, make_loader
    from plait.core.distributed import seed_everything
    from plait.core.model import build_model

    config, plugins = _config(steps, runs_dir)
    seed_everything(0)
    train = build_dataset(plugins, config, "train")
    model = build_model(plugins, config, tuple(train.modalities), len(train.classes))
    loader = make_loader(train, config.run.batch_size, True, 0, config.run.loader_workers)
    torch.manual_seed(0)
    return config, model, loader


def _loss(model_outputs, batch, config):
    import torch.nn.functional as F

    from plait.plugins.fusion import FusionOptions, contrastive_loss

    options = config.options(FusionOptions)
    loss = options.ce_weight * F.cross_entropy(model_outputs["logits"].float(), batch["label"],
                                               label_smoothing=options.label_smoothing)
    contrastive = contrastive_loss(model_outputs) if options.contrastive_weight else None
    return loss if contrastive is None else loss + options.contrastive_weight * contrastive


def _batches(loader, steps: int):
    """``steps`` batches, epoch after epoch."""
    done = 0
    while True:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def run_plain(steps: int, runs_dir: str) -> list[float]:
    import torch

    config, model, loader = _setup(steps, runs_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.run.lr, weight_decay=config.run.weight_decay,
                                  fused=True)
    model.train()
    ends = []
    for batch in _batches(loader, steps):
        outputs = model(batch)
        loss = _loss(outputs, batch, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def run_plait(steps: int, runs_dir: str, mlflow: bool = False) -> list[float]:
    import parity_clock

    from plait.core.loop import fit

    fit(*_config(steps, runs_dir, mlflow))
    return parity_clock.STEP_ENDS


def run_plait_mlflow(steps: int, runs_dir: str) -> list[float]:
    return run_plait(steps, runs_dir, mlflow=True)


def run_lightning(steps: int, runs_dir: str) -> list[float]:
    import lightning as L
    import torch

    config, model, loader = _setup(steps, runs_dir)
    ends: list[float] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return _loss(self.model(batch), batch, config)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=config.run.lr,
                                     weight_decay=config.run.weight_decay, fused=True)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            ends.append(time.perf_counter())

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        gradient_clip_val=1.0, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=runs_dir)
    trainer.fit(Module(), train_dataloaders=loader)
    return ends


def child(variant: str, steps: int, warmup: int) -> None:
    with tempfile.TemporaryDirectory() as runs_dir:
        runners = {"plain": run_plain, "plait": run_plait, "lightning": run_lightning, "plait_mlflow": run_plait_mlflow}
        ends = runners[variant](steps, runs_dir)
    batch = 64
    measured = ends[warmup:]
    rate = batch * (len(measured) - 1) / (measured[-1] - measured[0])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "samples_per_s": rate, "peak_rss_mb": rss, "steps": len(ends)}))


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def first_step_seconds(runs: int = 3) -> tuple[float, list[float], bool]:
    """(cold, warm runs, whether the page cache was dropped before the cold one)."""
    plait = Path(sys.executable).parent / "plait"
    times, dropped = [], False
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / "first_step"
            env = {**os.environ, "PARITY_FIRST_STEP_FILE": str(marker),
                   "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            if i == 0:
                dropped = _drop_page_cache()
            started = time.time()
            subprocess.run([str(plait), "train", str(ROOT / "plugins.yaml"), "scaling.num_workers=0",
                            "run.max_steps=1", f"run.runs_dir={tmp}", "plugins.parity_clock={}",
                            "plugins.progress=null", "plugins.curves=null"],
                           env=env, check=True, capture_output=True, text=True)
            times.append(float(marker.read_text()) - started)
    return times[0], times[1:], dropped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list (plait is always one)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = [v for v in VARIANTS if v in {*args.variants.split(","), "plait"}]
    if args.child:
        child(args.child, args.steps, args.warmup)
        return
    cold, warm, dropped = first_step_seconds() if "plain" in variants else (None, [None], False)
    if cold is not None:
        print(f"time to first step: cold {cold:.1f} s (page cache {'dropped' if dropped else 'not dropped'}), "
              f"warm {', '.join(f'{t:.1f}' for t in warm)} s", flush=True)
    rounds: list[dict[str, dict]] = []
    for number in range(args.rounds):
        results = {}
        for variant in variants:
            done = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(results)
        print(f"round {number + 1}: " + ", ".join(f"{v} {r['samples_per_s']:.1f} samples/s, {r['peak_rss_mb']:.0f} MB"
                                                for v, r in results.items()), flush=True)

    def median(variant: str, key: str) -> float | None:
        return statistics.median(r[variant][key] for r in rounds) if variant in variants else None

    def plait_over(other: str) -> float | None:
        if other not in variants:
            return None
        return round(statistics.median(r["plait"]["samples_per_s"] / r[other]["samples_per_s"] for r in rounds), 4)

    def rounded(value: float | None, digits: int = 0) -> float | None:
        return None if value is None else round(value, digits)

    mlflow_ratio = plait_over("plait_mlflow")
    print(json.dumps({"plait_vs_plain": plait_over("plain"), "plait_vs_lightning": plait_over("lightning"),
                      "mlflow_step_cost": None if mlflow_ratio is None else round(mlflow_ratio - 1, 4),
                      **{f"peak_rss_mb_{v}": rounded(median(v, "peak_rss_mb")) for v in VARIANTS},
                      "samples_per_s": {v: rounded(median(v, "samples_per_s"), 1) for v in variants},
                      "first_step_s_cold": rounded(cold, 2),
                      "first_step_s_warm": rounded(statistics.median(warm), 2) if cold is not None else None}))


if __name__ == "__main__":
    main()
