"""Knowledge distillation from a frozen teacher into the run being trained.

The teacher (``plait_teacher``) is a plait run folder's model (rebuilt from its config and newest
checkpoint) or a local transformers model folder (text only: a sequence-classification model gives
logits, a bare encoder such as MiniLM gives token states and a sentence embedding). It is frozen
(``eval()``, no gradients), on the student's device, and sees every training batch the student sees.
Three losses, each its own logged term:

- ``kd``, Hinton et al.'s soft targets: ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``;
  with ``fusion: {ce_weight: 1 - alpha}`` the total is Hinton's ``kd + (1 - alpha) * CE``.
- ``hidden``, TinyBERT-style: the mean squared error between a student module's output and a
  teacher module's (given by module path), through a learned projection when the widths differ,
  over real tokens only for token states (both sides must tokenize alike).
- ``embedding``: ``1 - cosine`` between the student's encoder output for a modality and the
  teacher's (a bare encoder's mean-pooled states), through a learned projection: for teachers
  without a classification head.

The projections belong to the student's model (``distill.*`` weights, so data-parallel workers
keep them in step and a resume restores them); its predictions never use them. The student may
see fewer modalities than the teacher: an audio-only student of a fused audio+image+text teacher
is cross-modal distillation. ``cache: true`` keeps the teacher's logits and embeddings per
sample id, for inputs that do not change between epochs. ``init_embeddings: true`` starts the
student's token embeddings from the teacher's principal components (DistilBERT's start from the
teacher). At the end the student's run folder gets
``report.md``: parameters, size, CPU latency and test accuracy of teacher and student (and of a
run without distillation, given as ``baseline``).

    plugins:
      spoken_digits: {}
      audio_encoder: {}
      fusion: {ce_weight: 0.1}
      distill: {teacher: runs/digits, temperature: 4, alpha: 0.9}

Its length (over 500 lines) is deliberate: a built-in plugin is one module, and the two kinds of
teacher, the three losses and the report share the teacher's outputs and the student's captured states.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from plait.core import checkpoint, hookspecs
from plait.core.config import Options, merge
from plait.core.data import SAMPLE_INDEX, TRANSFORM_SEED, ShardSampler, build_dataset, make_loader, move
from plait.core.distributed import barrier, rank, unwrap
from plait.core.errors import ConfigError, DataError, nearest
from plait.core.evaluation import evaluate
from plait.core.files import write_json_atomic
from plait.core.hookspecs import hookimpl
from plait.core.loop import fit
from plait.core.model import build_model, cpu_latency_ms
from plait.core.report import markdown_table, write_report
from plait.core.runs import load_run
from plait.core.stash import StashKey
from plait.modalities.text import WordPieceTokenizer, masked_mean


class HiddenPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(..., description="module path in the student, e.g. encoders.text.model.encoder.layer.1")
    teacher: str = Field(..., description="module path in the teacher, e.g. encoders.text.model.encoder.layer.3")
    weight: float = Field(1.0, gt=0)


class AttentionPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(..., description="an attention module with query, key and value projections, e.g. "
                         "encoders.text.model.encoder.layer.1.attention.self")
    teacher: str = Field(..., description="the teacher's, e.g. encoders.text.model.encoder.layer.5.attention.self")
    relation: Literal["attention", "value"] = Field("attention", description="attention: TinyBERT's MSE between "
                                                    "the attention scores (as many heads on both sides); value: "
                                                    "MiniLM's KL between value relations (any heads)")
    relation_heads: int | None = Field(None, ge=1, description="value: the heads the relations are split into "
                                       "(default: the teacher's)")
    weight: float = Field(1.0, gt=0)


class DistillOptions(Options):
    teacher: str | None = Field(None, description="a plait run folder, or a local transformers model folder (text); "
                                "under plait compress: the run being compressed")
    temperature: float = Field(4.0, gt=0, description="softens both distributions (T)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target loss; set fusion.ce_weight "
                         "to 1 - alpha; 0 for a teacher without logits")
    hidden: list[HiddenPair] = Field([], description="module outputs the student learns to match")
    attention: list[AttentionPair] = Field([], description="attention modules whose attention scores (TinyBERT) "
                                           "or value relations (MiniLM) the student learns to match")
    embedding: float = Field(0.0, ge=0, description="weight of the cosine loss between the student's and "
                             "the teacher's embedding of each of embedding_modalities")
    embedding_modalities: list[str] = Field(["text"], min_length=1)
    init_embeddings: bool = Field(False, description="start the student's token embeddings from the teacher's "
                                  "(DistilBERT's start from the teacher; the teacher's top principal components "
                                  "when the student is narrower): both must tokenize alike")
    max_length: int = Field(32, ge=4, description="a transformers teacher's token limit; match the student's")
    cache: bool = Field(False, description="keep the teacher's logits and embeddings per sample id in memory "
                        "(only for training inputs that do not change between epochs)")
    store: str | None = Field(None, description="a folder of the teacher's outputs over the training set, each "
                              "of data.views augmented views: written by the first run that names it (the "
                              "teacher runs once), read instead of the teacher after that")
    top_k: int = Field(0, ge=0, description="store: the teacher's largest logits kept per view (0: all)")
    mixup: float = Field(0.0, ge=0, description="function matching: Beta(mixup, mixup) mixup of each training "
                         "batch's images and waveforms, which teacher and student both see (0: off)")
    store_shard_rows: int = Field(50_000, ge=1, description="store: views per safetensors shard")
    teacher_workers: int = Field(0, ge=0, description="run the teacher in this many Ray actors of its own (other "
                                 "GPUs or nodes) instead of in every training worker: each worker sends its "
                                 "batches one batch ahead and receives logits and embeddings (0: in the worker)")
    teacher_resources: dict[str, float] = Field({"CPU": 1}, description="teacher_workers: the Ray resources of each "
                                                "teacher actor, e.g. {GPU: 1} or {CPU: 4}")
    baseline: str | None = Field(None, description="a run folder of the same student trained without "
                                 "distillation, for report.md")
    student: dict[str, dict[str, Any]] | None = Field(None, description="plait compress: plugin blocks merged "
                                                      "over the run's config to make the student, e.g. "
                                                      "{text_encoder: {hidden: 32}}")
    student_run: dict[str, Any] = Field({}, description="plait compress: run settings of the student's "
                                        "training (epochs, lr, max_steps...)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch. T^2 keeps the
    gradients' scale independent of T (Hinton et al. 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per feature; with ``mask`` [N, T] (token states [N, T, D]) only over real tokens."""
    error = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return error.mean()
    weights = mask.unsqueeze(-1).to(error.dtype)
    return (error * weights).sum() / (weights.sum() * error.shape[-1]).clamp(min=1.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cosine`` between matching rows, averaged: direction, not scale, is what is taught."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def mix_inputs(batch: dict, alpha: float) -> dict:
    """Mixup of the batch's images and waveforms, for function matching (Beyer et al. 2022): each row is
    mixed with another row of the batch, ``lam * own + (1 - lam) * other`` with ``lam`` drawn from
    Beta(alpha, alpha) and kept at least 1/2, so a row stays mostly itself and its label still holds for
    the cross-entropy term. A modality only one of the two rows has, and text, are left as they are."""
    size = batch["label"].shape[0]
    if size < 2:
        return batch
    lam = torch.distributions.Beta(alpha, alpha).sample((size,))
    lam = torch.maximum(lam, 1 - lam)
    other = torch.randperm(size)
    inputs, present = dict(batch["inputs"]), batch["present"]
    for modality, key in (("image", "image"), ("audio", "audio")):
        if modality not in inputs or modality not in present:
            continue
        values = inputs[modality][key]
        both = (present[modality] & present[modality][other.to(values.device)]).to(values.device)
        weight = torch.where(both, lam.to(values.device), torch.ones_like(lam, device=values.device))
        shape = (size,) + (1,) * (values.dim() - 1)
        mixed = {**inputs[modality], key: weight.view(shape) * values + (1 - weight.view(shape)) *
                 values[other.to(values.device)]}
        if "lengths" in mixed:  # a mixed clip lasts as long as the longer of the two
            lengths = mixed["lengths"]
            mixed["lengths"] = torch.where(both, torch.maximum(lengths, lengths[other.to(lengths.device)]), lengths)
        inputs[modality] = mixed
    return {**batch, "inputs": inputs}


def attention_scores(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, T, D] projections -> the scaled dot-product scores [N, heads, T, T], before the softmax."""
    n, t, d = query.shape
    q, k = (x.float().view(n, t, heads, d // heads).transpose(1, 2) for x in (query, key))
    return q @ k.transpose(-1, -2) / math.sqrt(d // heads)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT's attention transfer: MSE between [N, H, T, T] scores, over pairs of real tokens only."""
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).to(student.dtype)  # [N, 1, T, T]
    error = (student - teacher).pow(2) * pairs
    return error.sum() / (pairs.sum() * student.shape[1]).clamp(min=1.0)


def value_relation(value: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's value relation: per relation head, the log-softmax over real keys of the scaled dot products
    of the values with each other, [N, heads, T, T]. The values are split into ``heads`` whatever the
    attention's own head count, so a student and a teacher with different heads compare."""
    n, t, d = value.shape
    v = value.float().view(n, t, heads, d // heads).transpose(1, 2)
    scores = (v @ v.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.log_softmax(dim=-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between relation rows, averaged over the real query tokens of every head."""
    kl = (teacher.exp() * (teacher - student)).masked_fill(~mask[:, None, None, :], 0.0).sum(-1)  # [N, H, T]
    rows = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp(min=1.0)


class RunTeacher(nn.Module):
    """A plait run folder's model; module paths of ``hidden`` are relative to ``model``."""

    def __init__(self, model: nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.model, self.classes = model, classes

    def forward(self, batch: dict) -> dict:
        return {"logits": self.model(batch)["logits"]}

    def encoder(self, modality: str) -> nn.Module | None:
        encoders = getattr(self.model, "encoders", {})
        return encoders[modality] if modality in encoders else None


class TransformersTeacher(nn.Module):
    """A local transformers folder, on the text of the rows that have text. A sequence-classification
    model gives logits (its ``id2label`` are the classes); a bare encoder, token states and the
    mean-pooled sentence embedding. Module paths of ``hidden`` are relative to ``model``."""

    def __init__(self, folder: Path, max_length: int) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        super().__init__()
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        head = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
        loader = AutoModelForSequenceClassification if head else AutoModel
        self.model = loader.from_pretrained(str(folder), local_files_only=True)
        self.classes = [config.id2label[i] for i in range(config.num_labels)] if head else None
        self.tokenizer = WordPieceTokenizer(folder, max_length)
        self.out_dim = config.hidden_size
        self.attention_mask: torch.Tensor | None = None
        self.embedding: torch.Tensor | None = None

    def forward(self, batch: dict) -> dict:
        if "text" not in batch["present"]:
            raise DataError("plugins.distill.teacher: a transformers teacher reads text, and this data has none")
        rows = batch["present"]["text"].nonzero().squeeze(1)
        texts = [batch["inputs"]["text"]["text"][i] for i in rows.tolist()]
        # every row gets logits (a row without text: uniform ones, for evaluation); ``rows`` says which are real
        logits = torch.zeros(batch["label"].shape[0], len(self.classes or ()), device=rows.device)
        self.embedding = None
        if texts:
            device = next(self.model.parameters()).device
            ids, mask = (t.to(device) for t in self.tokenizer(texts))
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            self.attention_mask = mask
            self.embedding = masked_mean(out.hidden_states[-1], mask)
            if self.classes is not None:
                logits = logits.to(out.logits.dtype).index_copy(0, rows, out.logits)
        return {} if self.classes is None else {"logits": logits, "rows": rows}

    def encoder(self, modality: str) -> nn.Module | None:
        return self if modality == "text" else None


def _width(module: nn.Module, where: str) -> int:
    """The feature width a module outputs: ``out_dim``, else that of its last layer with a known one."""
    if hasattr(module, "out_dim"):
        return int(cast(Any, module).out_dim)
    for layer in reversed(list(module.modules())):
        for attribute in ("out_features", "out_channels", "num_features", "embedding_dim"):
            if hasattr(layer, attribute):
                return int(getattr(layer, attribute))
        if isinstance(layer, nn.LayerNorm):
            return int(layer.normalized_shape[-1])
    raise ConfigError(f"plugins.distill.{where}: cannot tell the width of {type(module).__name__}; "
                      "pick a module that ends in a Linear, convolution or normalization layer")


def _module(root: nn.Module, path: str, where: str, whose: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name]
        raise ConfigError(f"plugins.distill.{where}: the {whose} has no module '{path}'{nearest(path, names)}; "
                          f"its modules include {names[:6]}") from None


def _vocabulary(encoder: Any) -> str:
    return str(getattr(encoder.tokenizer, "vocabulary", type(encoder.tokenizer).__name__))


def init_embeddings(student: nn.Module, teacher: Any) -> None:
    """The student's token embeddings start as the teacher's, projected onto their top principal
    components when the student is narrower, at the student's initial scale. What the teacher knows
    of pieces the training set never shows reaches the student only this way: no loss on the
    training batches gives those rows a gradient."""
    encoders = getattr(student, "encoders", {})
    mine = encoders["text"] if "text" in encoders else None
    theirs = teacher.encoder("text")
    if mine is None or theirs is None or not hasattr(mine, "tokenizer") or not hasattr(theirs, "tokenizer"):
        raise ConfigError("plugins.distill.init_embeddings: the student and the teacher both need a text encoder "
                          "with token embeddings")
    if _vocabulary(mine) != _vocabulary(theirs):
        raise ConfigError("plugins.distill.init_embeddings: the embeddings are copied piece by piece, so both must "
                          f"tokenize alike; the teacher's vocabulary is {_vocabulary(theirs)}, the student's "
                          f"{_vocabulary(mine)}")
    target = mine.model.get_input_embeddings().weight
    source = theirs.model.get_input_embeddings().weight.detach().to("cpu", torch.float64)
    rows, width = min(target.shape[0], source.shape[0]), target.shape[1]
    if width > source.shape[1]:
        raise ConfigError(f"plugins.distill.init_embeddings: the student's token embeddings ({width} wide) are wider "
                          f"than the teacher's ({source.shape[1]}); make the student at most as wide")
    source = source[:rows] - source[:rows].mean(0)
    if width < source.shape[1]:
        source = source @ torch.linalg.svd(source, full_matrices=False).Vh[:width].T
    with torch.no_grad():
        scale = target[:rows].double().std() / source.std()
        target[:rows] = (source * scale).to(target.device, target.dtype)


def _first_tensor(output) -> torch.Tensor:
    """A module's output tensor (transformers layers return tuples)."""
    return output if isinstance(output, torch.Tensor) else next(t for t in output if isinstance(t, torch.Tensor))


def _capture(module: nn.Module, states: dict, key: str) -> None:
    """Keep ``module``'s output in ``states[key]`` at every forward."""
    def hook(_module, _args, output):
        states[key] = _first_tensor(output)
    module.register_forward_hook(hook)


def live_outputs(teacher: nn.Module, states: dict[str, torch.Tensor], batch: dict,
                 modalities: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run ``teacher`` on ``batch``: (logits, the rows they score (None: all), {modality: embedding of the
    rows that have it}); ``states`` is where its encoders' hooks put their outputs."""
    teacher.eval()  # whatever a caller did to it
    states.clear()
    out = teacher(batch)
    found = {m: teacher.embedding if isinstance(teacher, TransformersTeacher) else states.get(f"embedding_{m}")
             for m in modalities}
    return out.get("logits"), out.get("rows"), {m: e for m, e in found.items() if e is not None}


def _modality(path: str) -> str | None:
    """``encoders.text.model...`` -> ``text``: whose rows (and token mask) a module's output has."""
    parts = path.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "encoders" else None


class Projection(nn.Module):
    """Student width -> teacher width on the feature axis (channels for [N, C, H, W] maps)."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1) if x.dim() == 4 else self.linear(x)


class TeacherWorker:
    """The teacher in a Ray actor of its own (``teacher_workers``), on the actor's GPU when it has one:
    training workers send it batches and get back its logits and embeddings, on the CPU."""

    def __init__(self, options: dict[str, Any]) -> None:
        import ray

        self.options = DistillOptions.model_validate(options)
        torch.set_num_threads(max(1, int(self.options.teacher_resources.get("CPU", 1))))
        gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        self.device = torch.device("cuda" if gpu else "cpu")
        self.teacher = build_teacher(self.options).to(self.device)
        self.modalities = self.options.embedding_modalities if self.options.embedding else []
        self.states: dict[str, torch.Tensor] = {}
        self.widths: dict[str, int] = {}
        for modality in self.modalities:
            encoder: Any = self.teacher.encoder(modality)
            if encoder is not None:
                self.widths[modality] = int(encoder.out_dim)
                if not isinstance(self.teacher, TransformersTeacher):
                    _capture(encoder, self.states, f"embedding_{modality}")

    def describe(self) -> dict[str, Any]:
        """What the student's model needs before training: the classes and the embedding widths."""
        return {"classes": getattr(self.teacher, "classes", None), "widths": self.widths}

    def outputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        with torch.no_grad():
            logits, rows, embeddings = live_outputs(self.teacher, self.states, move(batch, self.device),
                                                    self.modalities)
        cpu = torch.device("cpu")
        return (None if logits is None else logits.to(cpu), None if rows is None else rows.to(cpu),
                {m: e.to(cpu) for m, e in embeddings.items()})


def _batch_key(batch: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which views a batch holds: the same for the batch as loaded and as it reaches the forward."""
    return tuple(batch[SAMPLE_INDEX].tolist()), tuple(batch[TRANSFORM_SEED].tolist())


class RemoteTeacher:
    """A training worker's side of a ``TeacherWorker``: ``send`` a batch as it is loaded (one batch ahead,
    ``plait_batch_loaded``), take its outputs in the forward; the time spent waiting is what it costs."""

    AHEAD = 4  #: requests kept for batches not yet trained on (one ahead is what the loop makes)

    def __init__(self, actors: list[Any], rank: int) -> None:
        import ray

        self.actor = actors[rank % len(actors)]
        info = ray.get(self.actor.describe.remote())
        self.classes: list[str] | None = info["classes"]
        self.widths: dict[str, int] = info["widths"]
        self.pending: dict[tuple, Any] = {}
        self.wait_s, self.waits = 0.0, 0

    def send(self, batch: dict) -> None:
        key = _batch_key(batch)
        if key not in self.pending:
            self.pending[key] = self.actor.outputs.remote(move(batch, torch.device("cpu")))
        while len(self.pending) > self.AHEAD:
            self.pending.pop(next(iter(self.pending)))

    def outputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        import ray

        key = _batch_key(batch)
        if key not in self.pending:  # not shown ahead (a store being written): sent now, and waited for
            self.send(batch)
        started = time.perf_counter()
        logits, rows, embeddings = ray.get(self.pending.pop(key))
        self.wait_s, self.waits = self.wait_s + time.perf_counter() - started, self.waits + 1
        device = batch["label"].device
        return (None if logits is None else logits.to(device), None if rows is None else rows.to(device),
                {m: e.to(device) for m, e in embeddings.items()})

    def wait_ms(self) -> float | None:
        """The mean wait per batch since the last call (None: no batch)."""
        if not self.waits:
            return None
        mean = 1000 * self.wait_s / self.waits
        self.wait_s, self.waits = 0.0, 0
        return mean


def start_teacher_workers(options: DistillOptions, run_key: str) -> list[Any]:
    """The run's teacher actors: created by rank 0, after every rank checked that the cluster has room
    for them beside the training workers; every rank returns the same handles."""
    import ray

    from plait.core.distributed import all_gather

    if not ray.is_initialized():
        raise ConfigError("plugins.distill.teacher_workers: the teacher runs in Ray actors, and this run is not on "
                          "Ray; train on Ray Train workers (scaling.num_workers >= 1), or set teacher_workers: 0")
    count, each = options.teacher_workers, options.teacher_resources
    need = {name: amount * count for name, amount in each.items() if amount}
    free = ray.available_resources()
    short = {name: amount for name, amount in need.items() if free.get(name, 0.0) < amount}
    if short:
        def says(resources: dict[str, float]) -> str:
            return ", ".join(f"{amount:g} {name}" for name, amount in resources.items())

        have = {name: free.get(name, 0.0) for name in need}
        raise ConfigError(f"plugins.distill.teacher_workers: {count} teacher actors of {says(each)} need "
                          f"{says(need)}, and the Ray cluster has {says(have)} free beside the training workers; "
                          "lower teacher_workers or teacher_resources, or add nodes")
    barrier()  # every rank has checked before rank 0 takes the resources
    names: list[str] = []
    actors: list[Any] = []
    if rank() == 0:
        token = hashlib.sha256(f"{run_key}:{os.getpid()}:{time.time_ns()}".encode()).hexdigest()[:12]
        names = [f"plait-teacher-{token}-{i}" for i in range(count)]
        extra = {name: amount for name, amount in each.items() if name not in ("CPU", "GPU")}
        worker = ray.remote(TeacherWorker)
        # owned by rank 0's process: they end with it, and a restarted worker group starts new ones
        actors = [worker.options(name=name, num_cpus=each.get("CPU", 0), num_gpus=each.get("GPU", 0),
                                 resources=extra or None, scheduling_strategy="DEFAULT").remote(options.model_dump())
                  for name in names]
    names = all_gather(names)[0]
    return actors or [ray.get_actor(name) for name in names]


STORE_MANIFEST = "store.json"


class TeacherStore:
    """The teacher's outputs, stored: per training sample and augmented view (``sample_index`` and
    ``transform_seed``, as the batches carry them), its logits (all, or the ``top_k`` largest with their
    classes) and its embedding of each of ``embedding_modalities`` the sample has. Sharded safetensors
    beside ``store.json``, which names the teacher, the views, the seed and each shard's digest.

    Written once (``write``), atomically: into a temporary folder renamed into place when complete."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        manifest = folder / STORE_MANIFEST
        if not manifest.is_file():
            raise ConfigError(f"plugins.distill.store: {folder} is not a teacher store (no {STORE_MANIFEST})")
        self.folder, self.info = folder, json.loads(manifest.read_text())
        columns: dict[str, list[torch.Tensor]] = {}
        for shard in self.info["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise ConfigError(f"plugins.distill.store: {path} is missing ({len(self.info['shards'])} shards in "
                                  f"{manifest}); write the store again (delete {folder})")
            if hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
                raise ConfigError(f"plugins.distill.store: {path} is not the shard {manifest} names (its digest "
                                  "differs); write the store again")
            for name, tensor in load_file(str(path)).items():
                columns.setdefault(name, []).append(tensor)
        self.columns = {name: torch.cat(parts) for name, parts in columns.items()}
        keys = zip(self.columns["sample_index"].tolist(), self.columns["transform_seed"].tolist(), strict=True)
        self.row = {key: row for row, key in enumerate(keys)}
        self.num_classes = len(self.info["classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    def width(self, modality: str) -> int | None:
        column = self.columns.get(f"embedding.{modality}")
        return None if column is None else int(column.shape[1])

    def check(self, identity: str, seed: int, views: int, samples: int) -> None:
        """One line for a store of another teacher or of other training views."""
        info, where = self.info, f"plugins.distill.store: {self.folder}"
        if info["teacher"] != identity:
            raise ConfigError(f"{where} holds the outputs of the teacher {info['teacher']}, not of {identity}; "
                              "give another store folder (or delete this one) to store this teacher's")
        found = (info["seed"], info["views"], info["samples"])
        if found != (seed, views, samples):
            raise ConfigError(f"{where} was written for run.seed {found[0]}, data.views {found[1]} and {found[2]} "
                              f"training samples; this run has {seed}, {views} and {samples}")

    def outputs(self, batch: dict, modalities: list[str]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                    dict[str, torch.Tensor]]:
        """(the teacher's logits of the batch's views, the rows they score (None: all), {modality: embeddings
        of the rows that have it})."""
        keys = zip(batch[SAMPLE_INDEX].tolist(), batch[TRANSFORM_SEED].tolist(), strict=True)
        try:
            rows = torch.tensor([self.row[key] for key in keys])
        except KeyError as missing:
            raise DataError(f"plugins.distill.store: {self.folder} has no view of sample {missing.args[0][0]} with "
                            f"transform seed {missing.args[0][1]}") from None
        device = batch["label"].device
        if "logits" in self.columns:
            logits = self.columns["logits"][rows]
        else:  # the top k; the classes left out get a logit far below them, so almost no probability
            values, indices = self.columns["topk_values"][rows], self.columns["topk_indices"][rows]
            logits = torch.full((len(rows), self.num_classes), -1e4).scatter(1, indices.long(), values)
        embeddings = {}
        for modality in modalities:
            if f"embedding.{modality}" in self.columns:
                has = batch["present"][modality].cpu() & self.columns[f"has.{modality}"][rows]
                if bool(has.any()):
                    embeddings[modality] = self.columns[f"embedding.{modality}"][rows[has]].to(device)
        scored = self.columns["scored"][rows] if "scored" in self.columns else None
        if scored is not None and bool(scored.all()):
            scored = None
        return logits.to(device), None if scored is None else scored.nonzero().squeeze(1).to(device), embeddings

    @staticmethod
    def write(folder: Path, distiller: Distiller, dataset: Any, options: DistillOptions, identity: str,
              config: Any, device: torch.device) -> None:
        """Run the live teacher (``distiller.teacher_outputs``, whose hooks already capture its embeddings)
        over every view of every training sample and store its outputs."""
        from safetensors.torch import save_file

        views = config.data.views or 1  # no augmentation: one view, whatever the epoch
        modalities = options.embedding_modalities if options.embedding else []
        widths = distiller.embedding_widths
        tmp = folder.with_name(f".{folder.name}.writing")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards: list[dict[str, Any]] = []
        columns: dict[str, list[torch.Tensor]] = {}
        keys = [(index, view) for view in range(views) for index in range(len(dataset))]
        batch_size = config.run.eval_batch_size

        def flush() -> None:
            if not columns:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            tensors = {key: torch.cat(parts).contiguous() for key, parts in columns.items()}
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "rows": int(tensors["sample_index"].shape[0]),
                           "sha256": hashlib.sha256((tmp / name).read_bytes()).hexdigest()})
            columns.clear()

        with torch.no_grad():
            for start in range(0, len(keys), batch_size):
                batch = move(dataset.collate_fn([dataset[key] for key in keys[start:start + batch_size]]), device)
                teacher_logits, scored, embeddings = distiller.teacher_outputs(batch)
                assert teacher_logits is not None  # a teacher without logits is refused in plait_fit_start
                logits = teacher_logits.float().cpu()
                size = logits.shape[0]
                scores = torch.ones(size, dtype=torch.bool) if scored is None else \
                    torch.zeros(size, dtype=torch.bool).index_fill(0, scored.cpu(), True)
                if options.top_k and options.top_k < logits.shape[1]:
                    values, indices = logits.topk(options.top_k, dim=1)
                    part = {"topk_values": values, "topk_indices": indices.to(torch.int32)}
                else:
                    part = {"logits": logits}
                part.update({SAMPLE_INDEX: batch[SAMPLE_INDEX].cpu(), TRANSFORM_SEED: batch[TRANSFORM_SEED].cpu(),
                             "scored": scores})  # a text teacher scores only the rows with text
                for modality in modalities:
                    has = batch["present"][modality].cpu()
                    full = torch.zeros(len(has), widths[modality])
                    if modality in embeddings:
                        full[has] = embeddings[modality].float().cpu()
                    part[f"embedding.{modality}"], part[f"has.{modality}"] = full, has
                for key, value in part.items():
                    columns.setdefault(key, []).append(value)
                if sum(len(c) for c in columns[SAMPLE_INDEX]) >= options.store_shard_rows:
                    flush()
        flush()
        write_json_atomic(tmp / STORE_MANIFEST, {
            "teacher": identity, "seed": config.run.seed, "views": config.data.views, "samples": len(dataset),
            "classes": list(dataset.classes), "top_k": options.top_k, "modalities": modalities, "shards": shards})
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)


class Distiller:
    """Computes the distillation terms in the student's forward (so that data-parallel training sees
    the projections used) and puts them in its outputs as ``distill``."""

    def __init__(self, options: DistillOptions, teacher: Any, student: nn.Module,
                 store: TeacherStore | None = None, remote: RemoteTeacher | None = None) -> None:
        """``teacher`` None: ``store`` or ``remote`` (teacher actors) gives its outputs."""
        self.options, self.teacher, self.store, self.remote = options, teacher, store, remote
        self.student_states: dict[str, torch.Tensor] = {}
        self.teacher_states: dict[str, torch.Tensor] = {}
        self.cached: dict[str, tuple[torch.Tensor | None, dict[str, torch.Tensor]]] = {}
        self.mask_owners: list[nn.Module | None] = []  # per hidden pair: whose attention_mask marks real tokens
        projections = {}
        if (options.hidden or options.attention) and remote is not None:
            raise ConfigError("plugins.distill.teacher_workers: the teacher actors send logits and embeddings, not "
                              "hidden states or attention; leave out hidden and attention, or teacher_workers")
        if options.mixup and remote is not None:
            raise ConfigError("plugins.distill.mixup: the mix is drawn in the student's forward, after the batch went "
                              "to the teacher workers; turn mixup off, or teacher_workers")
        if (options.hidden or options.attention) and (options.cache or options.store or teacher is None):
            raise ConfigError(f"plugins.distill.{'cache' if options.cache else 'store'}: only logits and embeddings "
                              "are kept, not hidden states or attention; turn it off or leave out hidden and "
                              "attention")
        for i, pair in enumerate(options.hidden):
            where = f"hidden[{i}]"
            mine = _module(student, pair.student, f"{where}.student", "student")
            theirs = _module(getattr(teacher, "model", teacher), pair.teacher, f"{where}.teacher", "teacher")
            _capture(mine, self.student_states, f"hidden{i}")
            _capture(theirs, self.teacher_states, f"hidden{i}")
            projections[f"hidden{i}"] = Projection(_width(mine, f"{where}.student"), _width(theirs, f"{where}.teacher"))
            self.mask_owners.append(self._mask_owner(student, pair, where))
        self.attention_heads: list[tuple[int, int]] = []  # per attention pair: (student's, teacher's) heads
        self.attention_masks: list[nn.Module] = []
        for i, link in enumerate(options.attention):
            self._attention_pair(i, link, student)
        encoders = getattr(student, "encoders", {})
        self.embedding_widths: dict[str, int] = {}  # the teacher's, per modality
        for modality in options.embedding_modalities if options.embedding else ():
            encoder: Any = teacher.encoder(modality) if teacher is not None else None
            width = (int(encoder.out_dim) if encoder is not None else store.width(modality) if store
                     else remote.widths.get(modality) if remote else None)
            if modality not in encoders or width is None:
                raise ConfigError(f"plugins.distill.embedding_modalities: '{modality}' must be encoded by both the "
                                  f"student ({sorted(encoders)}) and the teacher")
            key = f"embedding_{modality}"
            _capture(encoders[modality], self.student_states, key)
            if encoder is not None and not isinstance(teacher, TransformersTeacher):
                _capture(encoder, self.teacher_states, key)
            projections[key] = Projection(int(encoders[modality].out_dim), width)
            self.embedding_widths[modality] = width
        self.classes: list[str] | None = getattr(teacher or store or remote, "classes", None)
        if options.alpha and self.classes is None:
            raise ConfigError(f"plugins.distill.alpha: the teacher {options.teacher} has no classification head, "
                              "so no soft targets; set alpha: 0 and distil hidden states or the embedding")
        student.distill = nn.ModuleDict(projections)  # trained with the student, unused by its predictions
        if options.mixup and (options.store or options.cache):
            raise ConfigError("plugins.distill.mixup: the teacher must see each mixed batch, and stored outputs are "
                              "of unmixed views; turn mixup off, or store and cache off")
        student.register_forward_pre_hook(self._before_forward)
        student.register_forward_hook(self._after_forward)

    def _attention_pair(self, i: int, pair: AttentionPair, student: nn.Module) -> None:
        """Capture the query, key and value projections of both attention modules, and check they compare."""
        where, heads, widths = f"attention[{i}]", [], []
        for side, root, path, states in (("student", student, pair.student, self.student_states),
                                         ("teacher", getattr(self.teacher, "model", self.teacher), pair.teacher,
                                          self.teacher_states)):
            module = _module(root, path, f"{where}.{side}", side)
            parts = [name for name in ("query", "key", "value") if not isinstance(getattr(module, name, None),
                                                                                 nn.Module)]
            if parts or not hasattr(module, "num_attention_heads"):
                near = [name for name, m in root.named_modules() if hasattr(m, "query") and hasattr(m, "value")]
                raise ConfigError(f"plugins.distill.{where}.{side}: '{path}' is not an attention module with query, "
                                  f"key and value projections{nearest(path, near)}")
            for name in ("query", "key", "value"):
                _capture(getattr(module, name), states, f"attention{i}.{name}")
            heads.append(int(cast(Any, module).num_attention_heads))
            widths.append(_width(cast(nn.Module, module.value), f"{where}.{side}"))
        if pair.relation == "attention" and heads[0] != heads[1]:
            raise ConfigError(f"plugins.distill.{where}: the student's attention has {heads[0]} heads, the teacher's "
                              f"{heads[1]}; attention scores compare head by head, so use relation: value (MiniLM)")
        relation_heads = pair.relation_heads or heads[1]
        if pair.relation == "value" and any(width % relation_heads for width in widths):
            raise ConfigError(f"plugins.distill.{where}.relation_heads: {relation_heads} does not divide the value "
                              f"widths {widths[0]} (student) and {widths[1]} (teacher)")
        owner = self._mask_owner(student, pair, where)
        if owner is None:
            raise ConfigError(f"plugins.distill.{where}: '{pair.student}' is not inside a text encoder; attention "
                              "is compared over real tokens")
        self.attention_heads.append((heads[0], heads[1]) if pair.relation == "attention" else
                                    (relation_heads, relation_heads))
        self.attention_masks.append(owner)

    def _mask_owner(self, student: nn.Module, pair: HiddenPair | AttentionPair, where: str) -> nn.Module | None:
        """The student encoder whose ``attention_mask`` marks the real tokens of ``pair.student``'s
        states, after checking that the teacher's side tokenizes alike; None for other states."""
        modality = _modality(pair.student)
        encoders = getattr(student, "encoders", {})
        mine = encoders[modality] if modality in encoders else None
        if mine is None or not hasattr(mine, "tokenizer") or pair.student == f"encoders.{modality}":
            return None  # not inside a tokenizing encoder, or its pooled output
        theirs = (self.teacher if isinstance(self.teacher, TransformersTeacher)
                  else self.teacher.encoder(_modality(pair.teacher) or ""))
        if theirs is None or not hasattr(theirs, "tokenizer"):
            raise ConfigError(f"plugins.distill.{where}: the student's '{pair.student}' holds token states, the "
                              f"teacher's '{pair.teacher}' does not")
        ours, their = _vocabulary(mine), _vocabulary(theirs)
        if ours != their:
            raise ConfigError(f"plugins.distill.{where}: token states are matched position by position, so both "
                              f"must tokenize alike; the teacher's vocabulary is {their}, the student's {ours}")
        return mine

    def teacher_outputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """(logits, the rows they score (None: all), {modality: embedding of the rows that have it}) of
        the teacher, from the cache when it has them."""
        ids = batch.get("ids")
        modalities = self.options.embedding_modalities if self.options.embedding else []
        if self.store is not None:
            return self.store.outputs(batch, modalities)
        if self.options.cache and ids and all(i in self.cached for i in ids):
            device = batch["label"].device
            all_logits, all_embeddings = zip(*(self.cached[i] for i in ids), strict=True)
            stacked = {m: torch.stack([e[m] for e in all_embeddings if m in e]).to(device) for m in modalities
                       if any(m in e for e in all_embeddings)}
            return (torch.stack(all_logits).to(device) if all_logits[0] is not None else None), None, stacked
        if self.remote is not None:
            logits, rows, embeddings = self.remote.outputs(batch)
        else:
            logits, rows, embeddings = live_outputs(self.teacher, self.teacher_states, batch, modalities)
        if self.options.cache:
            if not ids or len(set(ids)) != len(ids) or rows is not None:
                raise DataError("plugins.distill.cache: every sample needs its own id, and the teacher must score "
                                "every row, to cache the teacher's outputs")
            row_of = {m: batch["present"][m].long().cumsum(0) - 1 for m in embeddings}  # batch row -> encoder row
            for position, sample in enumerate(ids):
                kept = {m: e[row_of[m][position]].cpu() for m, e in embeddings.items()
                        if bool(batch["present"][m][position])}
                self.cached[sample] = (logits[position].cpu() if logits is not None else None, kept)
        return logits, rows, embeddings

    def _before_forward(self, student: nn.Module, args: tuple) -> tuple | None:
        self.student_states.clear()
        if self.options.mixup and student.training and args and isinstance(args[0], dict):
            return (mix_inputs(args[0], self.options.mixup), *args[1:])  # the teacher sees this batch too
        return None

    def _after_forward(self, student: nn.Module, args: tuple, outputs: dict) -> dict | None:
        if not student.training or not isinstance(outputs, dict):
            return None
        batch, options = args[0], self.options
        with torch.no_grad():
            logits, rows, embeddings = self.teacher_outputs(batch)
        terms: dict[str, torch.Tensor] = {}
        if options.alpha and logits is not None:
            if rows is not None:
                logits, mine = logits[rows], outputs["logits"][rows]
            else:
                mine = outputs["logits"]
            if mine.shape[0]:
                terms["kd"] = kd_loss(mine, logits, options.temperature, options.alpha)
        projections = cast(nn.ModuleDict, student.distill)
        hidden, embedding = [], []
        for i, pair in enumerate(options.hidden):
            key = f"hidden{i}"
            mine, theirs = self.student_states.get(key), self.teacher_states.get(key)
            if mine is None or theirs is None:
                continue  # this batch has none of the modality
            mine = projections[key](mine)
            if mine.shape != theirs.shape:
                raise DataError(f"plugins.distill.hidden[{i}]: the student's '{pair.student}' gives {list(mine.shape)} "
                                f"(projected), the teacher's '{pair.teacher}' {list(theirs.shape)}")
            owner = self.mask_owners[i]
            mask = cast(Any, owner).attention_mask if owner is not None and mine.dim() == 3 else None
            hidden.append(pair.weight * hidden_loss(mine, theirs, mask))
        for modality, theirs in embeddings.items():
            mine = self.student_states.get(f"embedding_{modality}")
            if mine is not None:
                embedding.append(options.embedding * embedding_loss(projections[f"embedding_{modality}"](mine), theirs))
        attention = []
        for i, link in enumerate(options.attention):
            ours = [self.student_states.get(f"attention{i}.{name}") for name in ("query", "key", "value")]
            their = [self.teacher_states.get(f"attention{i}.{name}") for name in ("query", "key", "value")]
            if any(t is None for t in (*ours, *their)):
                continue  # this batch has no text
            sq, sk, sv = cast(list[torch.Tensor], ours)
            tq, tk, tv = cast(list[torch.Tensor], their)
            mask = cast(Any, self.attention_masks[i]).attention_mask.bool()
            student_heads, teacher_heads = self.attention_heads[i]
            if link.relation == "attention":
                loss = attention_loss(attention_scores(sq, sk, student_heads), attention_scores(tq, tk, teacher_heads),
                                      mask)
            else:
                loss = relation_loss(value_relation(sv, student_heads, mask), value_relation(tv, teacher_heads, mask),
                                     mask)
            attention.append(link.weight * loss)
        terms.update({name: cast(torch.Tensor, sum(losses)) for name, losses in (
            ("hidden", hidden), ("embedding", embedding), ("attention", attention)) if losses})
        outputs["distill"] = terms
        return outputs


@dataclass
class _Teacher:
    """The teacher of one run (in that run's ``plugins.stash``)."""

    model: nn.Module | None  # None: its outputs come from a store
    distiller: Distiller
    identity: str | None = None
    resumed: str | None = None  # the teacher a resumed run's checkpoint names
    actors: list[Any] = field(default_factory=list)  # teacher_workers: the teacher's Ray actors


TEACHER = StashKey[_Teacher]()


def _is_transformers_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "checkpoints").is_dir()


def _teacher_checkpoint(folder: Path) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"plugins.distill.teacher: {folder} does not exist (give a plait run folder or a "
                          "transformers model folder)")
    newest = checkpoint.latest(folder / "checkpoints")
    if newest is None:
        raise ConfigError(f"plugins.distill.teacher: {folder} has no checkpoint and no config.json (is it a plait "
                          "run folder or a transformers model folder?)")
    return newest


def _identity(folder: Path) -> str:
    """Which teacher this is: the digest of its weights (and, for a run, its newest checkpoint's name)."""
    if _is_transformers_folder(folder):
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]
        return f"{folder.resolve()}:{digest}"
    newest = _teacher_checkpoint(folder)
    digest = hashlib.sha256((newest / "model.safetensors").read_bytes()).hexdigest()[:16]
    return f"{folder.resolve()}:{newest.name}:{digest}"


@hookimpl
def plait_config_schema():
    return DistillOptions


@hookimpl
def plait_teacher(config):
    return build_teacher(config.options(DistillOptions))


def build_teacher(options: DistillOptions) -> RunTeacher | TransformersTeacher:
    """The frozen teacher ``options.teacher`` names: a transformers folder's model or a plait run's."""
    if options.teacher is None:
        raise ConfigError("plugins.distill.teacher: give the teacher (a plait run folder or a transformers "
                          "model folder)")
    folder = Path(options.teacher)
    if folder.is_dir() and _is_transformers_folder(folder):
        return TransformersTeacher(folder, options.max_length).eval().requires_grad_(False)

    _teacher_checkpoint(folder)
    try:
        _, _, state = load_run(folder)  # the same rebuilding `plait eval` does
    except DataError as exc:
        raise ConfigError(f"plugins.distill.teacher: {exc}") from None
    return RunTeacher(state.model, list(state.classes)).eval().requires_grad_(False)


@hookimpl
def plait_configure_model(model, config, plugins):
    options = config.options(DistillOptions)
    stored = bool(options.store and (Path(options.store) / STORE_MANIFEST).is_file())  # the teacher is not needed
    teacher = None if (stored or options.teacher_workers) and not options.init_embeddings else _teacher(plugins, config)
    if options.init_embeddings:
        init_embeddings(model, teacher)
    if stored:
        store = TeacherStore(Path(cast(str, options.store)))
        plugins.stash[TEACHER] = _Teacher(None, Distiller(options, None, model, store))
    elif options.teacher_workers:  # the teacher runs in its actors, not here
        actors = start_teacher_workers(options, f"{config.run.runs_dir}/{config.run.name}")
        plugins.stash[TEACHER] = _Teacher(None, Distiller(options, None, model, remote=RemoteTeacher(actors, rank())),
                                          actors=actors)
    else:
        plugins.stash[TEACHER] = _Teacher(teacher, Distiller(options, teacher, model))
    return None


def _teacher(plugins, config) -> Any:
    """The teacher, built on random streams of its own: building it draws initial weights (then
    overwritten), which would otherwise change the student's and a resumed run's dropout."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            teacher = plugins.first(hookspecs.plait_teacher, config=config)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    if teacher is None:
        raise ConfigError("plugins.distill: no plugin answered plait_teacher; give plugins.distill.teacher")
    return teacher


@hookimpl
def plait_fit_start(state):
    options, config = state.config.options(DistillOptions), state.config
    run = state.plugins.stash[TEACHER]
    store = run.distiller.store
    classes = run.distiller.classes
    if options.alpha and list(classes or []) != list(state.classes):
        raise ConfigError(f"plugins.distill.teacher: the teacher's classes {list(classes or [])[:12]} are not the "
                          f"student's {list(state.classes)[:12]} (same names, same order)")
    transforms = state.plugins.call_each(hookspecs.plait_sample_transforms, config=config, split="train")
    changing = ", ".join(sorted(name for name, found in transforms.items() if found))
    if options.cache and changing:
        raise ConfigError(f"plugins.distill.cache: the training inputs change every epoch (sample transforms of "
                          f"{changing}), so the teacher's outputs of one epoch do not hold for the next; turn cache "
                          "off, or store the teacher's outputs of data.views views (store: FOLDER)")
    if options.store and changing and not config.data.views:
        raise ConfigError(f"plugins.distill.store: the sample transforms of {changing} draw a new view every epoch; "
                          "set data.views: N to store the teacher's outputs of N views of each sample")
    if options.teacher is None:
        raise ConfigError("plugins.distill.teacher: give the teacher (the store records which teacher it holds)")
    identity = _identity(Path(options.teacher))
    if run.resumed not in (None, identity):
        raise ConfigError(f"plugins.distill.teacher: this run was distilled from {run.resumed}, but the "
                          f"teacher is now {identity}; a new teacher needs a new run.name")
    run.identity = identity
    if run.model is not None:
        run.model = run.model.to(state.device)
    if not options.store:
        return
    dataset = build_dataset(state.plugins, config, "train")
    assert dataset is not None  # build_dataset raises for a missing train split
    if store is None:  # the first run that names the store writes it, then reads it
        folder = Path(options.store)
        if run.distiller.classes is None:
            raise ConfigError(f"plugins.distill.store: the teacher {options.teacher} has no classification head; "
                              "a store keeps logits (and embeddings), so leave store out for this teacher")
        if state.is_main:
            TeacherStore.write(folder, run.distiller, dataset, options, identity, config, state.device)
        barrier()
        store = run.distiller.store = TeacherStore(folder)
    store.check(identity, config.run.seed, config.data.views, len(dataset))


@hookimpl
def plait_batch_loaded(state, batch):
    remote = state.plugins.stash[TEACHER].distiller.remote
    if remote is not None:  # the teacher works on it while the batch before trains
        remote.send(batch)


@hookimpl
def plait_train_metrics(state):
    remote = state.plugins.stash[TEACHER].distiller.remote
    wait = remote.wait_ms() if remote is not None else None
    return None if wait is None else {"teacher_wait_ms": round(wait, 3)}


@hookimpl
def plait_loss_terms(state, batch, outputs):
    return outputs.get("distill")


@hookimpl
def plait_state_dict(state):
    return {"teacher": state.plugins.stash[TEACHER].identity}


@hookimpl
def plait_load_state_dict(state, data):
    state.plugins.stash[TEACHER].resumed = data["teacher"]


@hookimpl
def plait_fit_end(state):
    """report.md in the student's run folder."""
    run = state.plugins.stash[TEACHER]
    if run.actors and state.is_main:  # training is over on every worker: the teacher actors are done
        import ray

        for actor in run.actors:
            ray.kill(actor)
    if "test" not in state.metrics:
        return
    options = state.config.options(DistillOptions)
    teacher, student = state.plugins.stash[TEACHER].model, unwrap(state.model)
    dataset = build_dataset(state.plugins, state.config, "test")
    assert dataset is not None  # the run was tested
    loader = make_loader(dataset, state.config.run.eval_batch_size, False, state.config.run.seed, 0,
                         ShardSampler(len(dataset), state.data_rank, state.data_world_size))
    teacher_acc = float("nan")
    if teacher is None:  # its outputs came from a store: its own run's figure, where it has one
        measured = Path(cast(str, options.teacher)) / "metrics.json"
        if measured.is_file():
            teacher_acc = json.loads(measured.read_text()).get("test", {}).get("fused", {}).get("accuracy", teacher_acc)
    elif getattr(teacher, "classes", None) is not None:
        # every worker evaluates its shard of the test split: the sums are collective
        teacher_state = type(state)(**{**vars(state), "model": teacher, "lockstep": False})
        teacher_acc = evaluate(teacher_state, loader, split="test")["accuracy"]
    if not state.is_main:
        return
    batch = move(next(iter(loader)), torch.device("cpu"))
    projections = sum(p.numel() for p in getattr(student, "distill", nn.Module()).parameters())
    rows: list[tuple[str, float, float, float, float, float]] = []
    for name, model, folder, accuracy, extra in (
        ("teacher", teacher, Path(cast(str, options.teacher)), teacher_acc, 0),
        ("student (distilled)", student, state.run_dir, state.metrics["test"]["fused"]["accuracy"], projections),
    ):
        newest = checkpoint.latest(folder / "checkpoints")
        files = [newest / "model.safetensors"] if newest else sorted(folder.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) / 2**20 if files else float("nan")
        if model is None:  # a stored teacher is not loaded for a latency figure
            rows.append((name, float("nan"), size, float("nan"), float("nan"), accuracy))
            continue
        cpu = model.to("cpu").eval()
        rows.append((name, sum(p.numel() for p in cpu.parameters()) - extra, size, cpu_latency_ms(cpu, batch, 1),
                     cpu_latency_ms(cpu, batch, 32), accuracy))
        model.to(state.device)
    if options.baseline:
        metrics = json.loads((Path(options.baseline) / "metrics.json").read_text())
        rows.append(("student without distillation", rows[1][1], float("nan"), float("nan"), float("nan"),
                     metrics["test"]["fused"]["accuracy"]))
    losses = ", ".join(name for name, on in (("soft targets", options.alpha), ("hidden states", options.hidden),
                                             ("embedding", options.embedding)) if on)
    lines = [f"# Distillation report: {state.config.run.name}", "",
             (f"Teacher: `{options.teacher}`; {losses}; T = {options.temperature}, alpha = {options.alpha}; "
             f"student modalities: {', '.join(state.modalities)}. Latency: CPU, one thread, median of 5. "
             f"The student's parameters leave out the {projections:,} of its training-only projections."), ""]
    figures = [[n, f"{p:,}", f"{s:.2f}", f"{l1:.2f}", f"{l32:.2f}", f"{a:.4f}"] for n, p, s, l1, l32, a in rows]
    lines += markdown_table(["model", "parameters", "size (MiB)", "latency bs1 (ms)", "latency bs32 (ms)",
                             "test accuracy"], [[cell.replace("nan", "-") for cell in row] for row in figures])
    write_report(state.run_dir / "report.md", lines)


@hookimpl
def plait_compress(model, job):
    """With ``student:``, train that student from the run being compressed (its teacher) and hand it on."""
    options = job.config.options(DistillOptions)
    if options.student is None:
        return None  # a distilled run's own block: it was distilled already
    kd = options.model_dump(exclude={"student", "student_run", "baseline"})
    student_raw = merge(job.raw, {"plugins": options.student})
    student_raw["plugins"]["distill"] = {**kd, "teacher": str(job.source_dir)}
    student_raw["run"] = {**job.raw["run"], **options.student_run, "name": f"{job.out_dir.name}-student"}
    config, plugins = job.resolve(student_raw)
    trained = fit(config, plugins)
    deployed_raw = {**student_raw, "run": job.raw["run"],
                    "plugins": {k: v for k, v in student_raw["plugins"].items() if k != "distill"}}
    job.replace_config(deployed_raw)
    _, deployed_plugins = job.resolve(deployed_raw)
    student = build_model(deployed_plugins, job.config, trained.modalities, len(trained.classes))
    weights = unwrap(trained.model).state_dict()
    student.load_state_dict({k: v for k, v in weights.items() if not k.startswith("distill.")})
    fused = trained.metrics.get("test", {}).get("fused", {}).get("accuracy")
    accuracy = f", test accuracy {fused:.4f}" if fused is not None else ""
    job.notes.append(f"distilled into a student of {sum(p.numel() for p in student.parameters()):,} parameters "
                     f"(the run had {sum(p.numel() for p in model.parameters()):,}), trained in "
                     f"{Path(config.run.runs_dir) / config.run.name}{accuracy}")
    return student.to(trained.device).eval()
