"""Knowledge distillation from a trained plait run (the teacher) into the run being trained.

The teacher is the model of a plait run folder (``plait_teacher``): rebuilt from its config,
loaded from its newest checkpoint, frozen (``eval()``, no gradients) and moved to the student's
device. Each training batch also goes through the teacher, and the soft-target loss of Hinton
et al. is added as the term ``kd``:

    kd = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

With ``fusion: {ce_weight: 1 - alpha}`` the total is Hinton's ``kd + (1 - alpha) * CE``.

The student may see fewer modalities than the teacher: a fused audio+image+text teacher
trains an audio-only student (its config simply has only the audio encoder), which is
cross-modal distillation. At the end the student's run folder gets ``report.md``: parameters,
size, CPU latency and test accuracy of teacher and student (and of a run without distillation,
given as ``baseline``).

    plugins:
      spoken_digits: {}
      audio_encoder: {}
      fusion: {ce_weight: 0.1}
      distill: {teacher: runs/digits, temperature: 4, alpha: 0.9}
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from plait.core import checkpoint
from plait.core.config import Options
from plait.core.errors import ConfigError, DataError
from plait.core.hookspecs import hookimpl


class DistillOptions(Options):
    teacher: str = Field(..., description="a plait run folder whose model teaches")
    temperature: float = Field(4.0, gt=0, description="softens both distributions (T)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target loss; set fusion.ce_weight "
                         "to 1 - alpha")
    baseline: str | None = Field(None, description="a run folder of the same student trained without "
                                 "distillation, for report.md")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch. T^2 keeps the
    gradients' scale independent of T (Hinton et al. 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl


class _Teacher:
    """The teacher of the run this process trains."""

    model: torch.nn.Module | None = None
    identity: str | None = None
    resumed: str | None = None  # the teacher a resumed run's checkpoint names


def _teacher_checkpoint(folder: Path) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"plugins.distill.teacher: {folder} does not exist (give a plait run folder)")
    newest = checkpoint.latest(folder / "checkpoints")
    if newest is None:
        raise ConfigError(f"plugins.distill.teacher: {folder} has no checkpoint (is it a plait run folder?)")
    return newest


def _identity(folder: Path) -> str:
    """Which teacher this is: its newest checkpoint's name and a digest of its weights."""
    newest = _teacher_checkpoint(folder)
    digest = hashlib.sha256((newest / "model.safetensors").read_bytes()).hexdigest()[:16]
    return f"{folder.resolve()}:{newest.name}:{digest}"


@hookimpl
def plait_config_schema():
    return DistillOptions


@hookimpl
def plait_teacher(config):
    from plait.launch.evaluate import load_run  # the same rebuilding `plait eval` does

    folder = Path(config.options(DistillOptions).teacher)
    _teacher_checkpoint(folder)
    # Building the teacher draws random initial weights (then overwritten): on the training's own
    # random streams, a resumed run's dropout would no longer match the uninterrupted run's.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            _, _, state = load_run(folder)
    except DataError as exc:
        raise ConfigError(f"plugins.distill.teacher: {exc}") from None
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    model = state.model.eval().requires_grad_(False)
    model.classes = list(state.classes)
    return model


@hookimpl
def plait_fit_start(state):
    options = state.config.options(DistillOptions)
    teacher = state.plugins.first("plait_teacher", config=state.config)
    if list(teacher.classes) != list(state.classes):
        raise ConfigError(f"plugins.distill.teacher: the teacher's classes {list(teacher.classes)[:12]} are not the "
                          f"student's {list(state.classes)[:12]} (same names, same order)")
    identity = _identity(Path(options.teacher))
    resumed, _Teacher.resumed = _Teacher.resumed, None
    if resumed not in (None, identity):
        raise ConfigError(f"plugins.distill.teacher: this run was distilled from {resumed}, but the "
                          f"teacher is now {identity}; a new teacher needs a new run.name")
    _Teacher.model, _Teacher.identity = teacher.to(state.device), identity


@hookimpl
def plait_loss_terms(state, batch, outputs):
    options = state.config.options(DistillOptions)
    teacher = _Teacher.model
    teacher.eval()  # whatever a caller did to it
    with torch.no_grad():
        teacher_logits = teacher(batch)["logits"]
    return {"kd": kd_loss(outputs["logits"], teacher_logits, options.temperature, options.alpha)}


@hookimpl
def plait_state_dict(state):
    return {"teacher": _Teacher.identity}


@hookimpl
def plait_load_state_dict(state, data):
    _Teacher.resumed = data["teacher"]


def _latency_ms(model: torch.nn.Module, batch: dict, size: int) -> float:
    """Median CPU forward time of ``size`` samples of ``batch``, one thread."""
    from plait.core.model import select_rows

    rows = torch.arange(size) % batch["label"].shape[0]
    small = {"label": batch["label"][rows], "present": {m: v[rows] for m, v in batch["present"].items()},
             "inputs": {m: select_rows(v, rows) for m, v in batch["inputs"].items()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model(small)
            times = []
            for _ in range(5):
                started = time.perf_counter()
                model(small)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * sorted(times)[len(times) // 2]


@hookimpl
def plait_fit_end(state):
    """report.md in the student's run folder."""
    if "test" not in state.metrics:
        return
    from plait.core.loop import ShardSampler, build_dataset, evaluate, make_loader, move

    options = state.config.options(DistillOptions)
    teacher, student = _Teacher.model, getattr(state.model, "module", state.model)
    dataset = build_dataset(state.plugins, state.config, "test")
    loader = make_loader(dataset, state.config.run.eval_batch_size, False, state.config.run.seed, 0,
                         ShardSampler(len(dataset), state.rank, state.world_size))
    # every worker evaluates its shard of the test split: the sums are collective
    teacher_acc = evaluate(type(state)(**{**vars(state), "model": teacher, "lockstep": False}), loader)["accuracy"]
    if not state.is_main:
        return
    batch = move(next(iter(loader)), torch.device("cpu"))
    rows = []
    for name, model, folder, accuracy in (
        ("teacher", teacher, Path(options.teacher), teacher_acc),
        ("student (distilled)", student, state.run_dir, state.metrics["test"]["fused"]["accuracy"]),
    ):
        newest = checkpoint.latest(folder / "checkpoints")
        size = (newest / "model.safetensors").stat().st_size / 2**20 if newest else float("nan")
        cpu = model.to("cpu").eval()
        rows.append((name, sum(p.numel() for p in cpu.parameters()), size, _latency_ms(cpu, batch, 1),
                     _latency_ms(cpu, batch, 32), accuracy))
    teacher.to(state.device)
    student.to(state.device)
    if options.baseline:
        metrics = json.loads((Path(options.baseline) / "metrics.json").read_text())
        rows.append(("student without distillation", rows[1][1], float("nan"), float("nan"), float("nan"),
                     metrics["test"]["fused"]["accuracy"]))
    lines = [f"# Distillation report: {state.config.run.name}", "",
             f"Teacher: `{options.teacher}`; T = {options.temperature}, alpha = {options.alpha}; "
             f"student modalities: {', '.join(state.modalities)}. Latency: CPU, one thread, median of 5.", "",
             "| model | parameters | size (MiB) | latency bs1 (ms) | latency bs32 (ms) | test accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {p:,} | {s:.2f} | {l1:.2f} | {l32:.2f} | {a:.4f} |" for n, p, s, l1, l32, a in rows]
    (state.run_dir / "report.md").write_text("\n".join(lines).replace("nan", "-") + "\n")
