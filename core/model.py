"""The model every run trains: one encoder per modality, a fusion module and a head.

The parts come from plugins; this module only wires them, so that a sample lacking a
modality never runs through that modality's encoder.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Literal, cast

import torch
from torch import nn

from . import hookspecs
from .config import PlaitConfig
from .errors import PluginError
from .manager import Plugins

__all__ = ["MultimodalModel", "build_model", "cpu_latency_ms", "leaves_parameters_unused", "median_forward_ms",
           "part_of", "select_rows", "touch"]

log = logging.getLogger("plait")


def select_rows(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows ``rows`` of a collated modality dict (tensors and lists alike)."""
    out: dict[str, Any] = {}
    index = None
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, rows)
        else:
            index = rows.tolist() if index is None else index
            out[key] = [value[i] for i in index]
    return out


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.head = head
        #: What an encoder does in a forward whose batch has no sample of its modality:
        #: - "skip": nothing (one process; its parameters get no gradient that step);
        #: - "touch": its parameters enter the logits times zero, without running it, so that
        #:   each gets a zero gradient. DDP then needs no search for unused parameters
        #:   (``find_unused_parameters``), an extra autograd traversal every step.
        #: - "run": sharded training (FSDP), where an encoder's forward and backward are
        #:   collectives every worker must join. Such a worker runs the encoder (in eval mode,
        #:   so no batch-norm statistics change) on a row it kept from an earlier batch; the
        #:   result enters the logits times zero.
        self.idle_encoders: Literal["skip", "touch", "run"] = "skip"
        self._examples: dict[str, dict[str, Any]] = {}

    @property
    def may_leave_parameters_unused(self) -> bool:
        """See ``leaves_parameters_unused``: only skipped encoders leave parameters unused here."""
        return self.idle_encoders == "skip"

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        present: dict[str, torch.Tensor] = batch["present"]
        size = batch["label"].shape[0]
        embeddings, idle = {}, []
        for modality, encoder in self.encoders.items():
            mask = present[modality]
            rows = mask.nonzero().squeeze(1)
            encoded = encoder(select_rows(batch["inputs"][modality], rows)) if rows.numel() else None
            if self.idle_encoders == "run":
                if encoded is None:
                    idle.append(self._idle_pass(modality, encoder))
                else:
                    self._examples[modality] = select_rows(batch["inputs"][modality], rows[:1])
            elif self.idle_encoders == "touch" and encoded is None and torch.is_grad_enabled():
                touched = touch(encoder)
                if touched is not None:
                    idle.append(touched)
            emb = torch.zeros(size, int(cast(Any, encoder).out_dim), device=mask.device,
                              dtype=encoded.dtype if encoded is not None else torch.float32)
            embeddings[modality] = emb.index_copy(0, rows, encoded) if encoded is not None else emb
        outputs: dict[str, Any] = self.fusion(embeddings, {m: present[m] for m in self.encoders})
        logits = self.head(outputs["fused"])
        outputs["logits"] = logits + torch.stack(idle).sum() if idle else logits
        return outputs

    def _idle_pass(self, modality: str, encoder: nn.Module) -> torch.Tensor:
        """Zero, computed through ``encoder`` (see ``idle_encoders``)."""
        example = self._examples.get(modality)
        if example is None:
            raise PluginError(f"the first batch of this worker has no '{modality}' sample, and under sharded "
                              "training every worker runs every encoder; use a larger batch_size")
        was_training = encoder.training
        encoder.eval()
        try:
            zero: torch.Tensor = encoder(example).float().sum() * 0.0
            return zero
        finally:
            encoder.train(was_training)


def part_of(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...], *path: str) -> nn.Module | None:
    """The submodule at ``path`` (attribute names or ``ModuleDict`` keys: ``"encoders", "text"``) if it is a
    ``kind`` (or one of several), else None: how a plugin finds the part it built in the model a run assembled."""
    found: Any = model
    for name in path:
        if isinstance(found, nn.ModuleDict):
            found = found[name] if name in found else None
        else:
            found = getattr(found, name, None)
        if found is None:
            return None
    return found if isinstance(found, kind) else None


def touch(module: nn.Module) -> torch.Tensor | None:
    """Zero, computed from every trainable parameter of ``module``, so that each gets a zero
    gradient; a sparse embedding's is sparse (DDP expects it so) and names one real row (an empty
    sparse gradient is one gloo cannot reduce). None when nothing in ``module`` trains."""
    terms = []
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(sub, nn.Embedding) and sub.sparse and param is sub.weight:
                row = 1 if sub.padding_idx == 0 else 0  # the padding row gets no gradient at all
                terms.append(sub(torch.tensor([row], device=param.device)).sum())
            else:
                terms.append(param.sum())
    return torch.stack(terms).sum() * 0.0 if terms else None


def leaves_parameters_unused(model: nn.Module) -> bool:
    """Whether a training step of ``model`` may leave a trainable parameter without a gradient,
    as its modules declare: a module whose forward can bypass some of its own parameters sets
    ``may_leave_parameters_unused = True`` (a plugin knows its modules; nothing is guessed).
    DDP searches for such parameters every step only when this is True."""
    return any(getattr(module, "may_leave_parameters_unused", False) for module in model.modules())


def build_model(plugins: Plugins, config: PlaitConfig, modalities: tuple[str, ...], num_classes: int) -> nn.Module:
    """Ask the plugins for the model (or its encoders, fusion and head), then let them rewrite it."""
    whole = plugins.first(hookspecs.plait_build_model, config=config, modalities=modalities, num_classes=num_classes)
    if whole is not None:
        configured: nn.Module = plugins.chain(hookspecs.plait_configure_model, "model", model=whole, config=config,
                                              plugins=plugins)
        return configured
    encoders = {}
    for modality in modalities:
        encoder = plugins.first(hookspecs.plait_build_encoder, modality=modality, config=config)
        if encoder is None:
            log.warning("no plugin encodes modality '%s'; it is ignored", modality)
            continue
        encoders[modality] = encoder
    if not encoders:
        raise PluginError(
            f"no plugin builds an encoder for the data's modalities {list(modalities)}; "
            "add text_encoder, image_encoder or audio_encoder to plugins:"
        )
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    fusion = plugins.first(hookspecs.plait_build_fusion, config=config, dims=dims)
    if fusion is None:
        raise PluginError("no plugin builds a fusion module; add 'fusion' to plugins:")
    head = plugins.first(hookspecs.plait_build_head, config=config, in_dim=int(fusion.out_dim), num_classes=num_classes)
    if head is None:
        raise PluginError("no plugin builds a classification head; add 'fusion' to plugins:")
    assembled: nn.Module = plugins.chain(hookspecs.plait_configure_model, "model",
                                         model=MultimodalModel(encoders, fusion, head), config=config, plugins=plugins)
    return assembled


def cpu_latency_ms(model: torch.nn.Module, batch: dict[str, Any], size: int) -> float:
    """Median forward time (ms) of ``size`` samples of ``batch`` (rows repeated as needed), one thread,
    on the model's device as it is: how report.md files compare models."""
    rows = torch.arange(size) % batch["label"].shape[0]
    small = {"label": batch["label"][rows], "present": {m: v[rows] for m, v in batch["present"].items()},
             "inputs": {m: select_rows(v, rows) for m, v in batch["inputs"].items()}}
    return median_forward_ms(model, small)


def median_forward_ms(model: torch.nn.Module, batch: Any, repeats: int = 5) -> float:
    """Median time (ms) of ``repeats`` forward passes on ``batch`` after one warm-up, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model(batch)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * sorted(times)[len(times) // 2]
