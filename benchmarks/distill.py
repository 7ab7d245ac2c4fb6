"""Distillation on spoken_digits: the default model teaches a student a tenth its size.

    .venv/bin/python benchmarks/distill.py [--seeds 0 1 2] [--epochs 8] [--jobs 2] [--runs-dir DIR]

For each seed (each run in Ray Train's local mode, one worker): the teacher (plugins.yaml's
model), the student distilled from it and the same student trained the same number of steps
without distillation. The runs go ``--jobs`` at a time, each in a process of its own with
``cpus // jobs`` threads: these models scale poorly past one thread, so two one-thread runs side by
side do about 1.6x the work of one two-thread run here. A student starts when its teacher is done.

The student: a 1-layer, 32-wide text encoder on bytes (a 257-entry
vocabulary instead of MiniLM's 30,522 pieces), image channels [16, 32, 64, 96], a 3-block audio
CNN with 64-wide output. Distillation: soft targets alone, with no label term (T = 1, alpha = 1,
fusion.ce_weight = 0: Beyer et al. 2022's plain KL, which at seed 0 closed 0.94 of the gap where Hinton's
T = 4, alpha = 0.9 closed 0.19), and the cosine between the student's and the teacher's audio and image
embeddings (through learned projections 64 -> 128 and 96 -> 256). Accuracies are fused test
accuracy; each figure is the mean over seeds, and `*_spread` the max - min over seeds.

Last line: JSON {"teacher_params", "student_params", "teacher_acc", "student_acc",
"student_nokd_acc", "student_acc_spread", "student_nokd_acc_spread", "gap_closed" (the mean over seeds of
``(student - nokd) / (teacher - nokd)``: the share of the gap between the student trained alone and the
teacher that distillation closes), "gap_closed_spread", "student_over_teacher" (student_acc / teacher_acc),
"seeds", "epochs", "student_epochs", "views", "store", "mixup", "kd" (the distill options used), "jobs"}.

``--student-epochs`` gives the distilled student and the student without distillation the same longer
schedule (a patient student); ``--views N --store`` teaches from the teacher's outputs of N stored augmented
views instead of the live teacher; ``--mixup A`` mixes the distilled student's images and waveforms (function
matching: the teacher sees the mixed batch too); ``--temperature``, ``--alpha`` and ``--embedding`` change the
losses.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing
import os
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from plait.core.config import load_config
from plait.core.runs import prepare
from plait.launch import ray_runner

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {  # about a tenth of the default model
    "text_encoder": {"tokenizer": "bytes", "hidden": 32, "layers": 1, "heads": 2},
    "image_encoder": {"timm_kwargs": {"channels": [16, 32, 64, 96]}},
    "audio_encoder": {"channels": [16, 32, 64], "dim": 64},
}
KD = {"temperature": 1.0, "alpha": 1.0, "embedding": 1.0, "embedding_modalities": ["audio", "image"]}


def run(raw: dict, name: str, seed: int, epochs: int, runs_dir: str) -> dict:
    raw = copy.deepcopy(raw)
    raw["run"].update(name=name, seed=seed, epochs=epochs, runs_dir=runs_dir)
    raw.setdefault("scaling", {})["num_workers"] = 0
    for noisy in ("progress", "curves"):
        raw["plugins"].pop(noisy, None)
    config, _ = prepare(raw, f"benchmarks/distill.py ({name})")
    return ray_runner.train(config, raw)


def _threaded(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    import torch

    torch.set_num_threads(threads)  # before the run: local mode trains with the process's thread count
    return fn(*args)


class Runs:
    """Training runs in ``jobs`` fresh processes at a time, the machine's cores shared out as threads."""

    def __init__(self, jobs: int) -> None:
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(_threaded, self.threads, fn, *args)

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=exc[0] is not None)


def student_config(base: dict, teacher_dir: str | None, views: int = 0, store: str | None = None,
                   mixup: float = 0.0, kd: dict | None = None) -> dict:
    raw = copy.deepcopy(base)
    for name, options in STUDENT.items():
        raw["plugins"][name] = {**raw["plugins"].get(name, {}), **options}
    if views:
        raw.setdefault("data", {})["views"] = views
    if teacher_dir is not None:
        kd = kd or KD
        raw["plugins"]["fusion"] = {**raw["plugins"]["fusion"], "ce_weight": 1 - kd["alpha"]}
        raw["plugins"]["distill"] = {"teacher": teacher_dir, **kd, "mixup": mixup,
                                     **({"store": store} if store else {})}
    return raw


def run_name(role: str, seed: int, raw: dict, epochs: int | None = None) -> str:
    """``role-seed-digest``: a kept ``--runs-dir`` continues a run only when its settings are the same."""
    digest = hashlib.sha256(json.dumps([raw, epochs], sort_keys=True).encode()).hexdigest()[:8]
    return f"{role}-{seed}-{digest}"


def gap_closed(teacher: float, student: float, nokd: float) -> float:
    """The share of the gap between the student trained alone and the teacher that distillation closes."""
    return (student - nokd) / (teacher - nokd) if teacher != nokd else float("nan")


def parameters(raw: dict) -> int:
    from plait.core.model import build_model

    config, plugins = prepare(copy.deepcopy(raw), "benchmarks/distill.py")
    model = build_model(plugins, config, ("text", "image", "audio"), 10)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="the teacher's epochs")
    parser.add_argument("--student-epochs", type=int, help="both students' epochs (default: --epochs)")
    parser.add_argument("--views", type=int, default=0, help="data.views of the students (0: a new view each epoch)")
    parser.add_argument("--store", action="store_true", help="teach from the teacher's stored outputs of --views views")
    parser.add_argument("--mixup", type=float, default=0.0, help="distill.mixup of the distilled student (function "
                        "matching; 0: off)")
    parser.add_argument("--temperature", type=float, default=KD["temperature"])
    parser.add_argument("--alpha", type=float, default=KD["alpha"], help="soft-target weight; CE gets 1 - alpha")
    parser.add_argument("--embedding", type=float, default=KD["embedding"], help="embedding cosine weight (0: off)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, cpus // jobs threads each")
    parser.add_argument("--runs-dir", help="keep the run folders here (default: a temporary folder); a run "
                        "whose folder is complete and whose settings are the same (its name's digest) is only "
                        "evaluated again")
    args = parser.parse_args()
    if args.store and not args.views:
        parser.error("--store needs --views N: the augmented views to store")
    student_epochs = args.student_epochs or args.epochs
    kd = {**KD, "temperature": args.temperature, "alpha": args.alpha, "embedding": args.embedding}
    base = load_config(ROOT / "plugins.yaml")
    results: dict[str, list[float]] = {"teacher": [], "student": [], "nokd": []}
    with tempfile.TemporaryDirectory() as tmp, Runs(args.jobs) as runs:
        runs_dir = args.runs_dir or tmp
        nokd_raw = student_config(base, None, args.views)
        teacher_names = {seed: run_name("teacher", seed, base, args.epochs) for seed in args.seeds}
        teachers = {seed: runs.submit(run, base, teacher_names[seed], seed, args.epochs, runs_dir)
                    for seed in args.seeds}
        alone = {seed: runs.submit(run, nokd_raw, run_name("nokd", seed, nokd_raw, student_epochs), seed,
                                   student_epochs, runs_dir) for seed in args.seeds}
        taught = {}
        for seed in args.seeds:  # each distilled student once its teacher's folder is complete
            teachers[seed].result()
            teacher_dir = str(Path(runs_dir) / teacher_names[seed])
            store = f"{teacher_dir}-store-{args.views}" if args.store else None
            raw = student_config(base, teacher_dir, args.views, store, args.mixup, kd)
            taught[seed] = runs.submit(run, raw, run_name("student", seed, raw, student_epochs), seed, student_epochs,
                                       runs_dir)
        for seed in args.seeds:
            for key, future in (("teacher", teachers[seed]), ("student", taught[seed]), ("nokd", alone[seed])):
                results[key].append(future.result()["test"]["fused"]["accuracy"])
            print(f"seed {seed}: teacher {results['teacher'][-1]:.4f}, student {results['student'][-1]:.4f}, "
                  f"without distillation {results['nokd'][-1]:.4f}", flush=True)
    closed = [gap_closed(*figures) for figures in zip(results["teacher"], results["student"], results["nokd"],
                                                          strict=True)]
    spread = {k: max(v) - min(v) for k, v in results.items()}
    print(json.dumps({
        "teacher_params": parameters(base), "student_params": parameters(student_config(base, None)),
        "teacher_acc": round(statistics.mean(results["teacher"]), 4),
        "student_acc": round(statistics.mean(results["student"]), 4),
        "student_nokd_acc": round(statistics.mean(results["nokd"]), 4),
        "student_acc_spread": round(spread["student"], 4), "student_nokd_acc_spread": round(spread["nokd"], 4),
        "gap_closed": round(statistics.mean(closed), 3), "gap_closed_spread": round(max(closed) - min(closed), 3),
        "student_over_teacher": round(statistics.mean(results["student"]) / statistics.mean(results["teacher"]), 4),
        "seeds": args.seeds, "epochs": args.epochs, "student_epochs": student_epochs,
        "views": args.views, "store": args.store, "mixup": args.mixup, "kd": kd, "jobs": args.jobs,
    }))


if __name__ == "__main__":
    main()
