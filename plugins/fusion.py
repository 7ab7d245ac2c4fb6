"""Fusion and classification head: concat or attention fusion over modality tokens,
modality dropout, a learned embedding for each missing modality, cross-entropy, and an
optional CLIP-style contrastive loss (InfoNCE, learnable clamped temperature)."""
from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.core.parallel import transformer_plan

MAX_LOGIT_SCALE = math.log(100.0)


class FusionOptions(TrainingControl):
    """The fusion's options; its ``freeze``, ``lr_scale``, ... are the fusion's, ``head:`` holds the head's."""

    kind: Literal["attention", "concat"] = "attention"
    dim: int = Field(128, ge=8)
    layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.25, ge=0, lt=1,
                                    description="chance to hide each modality of a sample in training")
    contrastive_weight: float = Field(0.0, ge=0)
    contrastive_gather: bool = Field(False, description="draw contrastive negatives from every worker's batch: "
                                     "embeddings all-gathered with their gradients, each worker's rows against all")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term (1 - alpha under distillation)")
    head: TrainingControl = Field(default_factory=TrainingControl, description="how the classification head trains")


class Fusion(nn.Module):
    def __init__(self, options: FusionOptions, dims: dict[str, int]) -> None:
        super().__init__()
        self.options = options
        self.modalities = list(dims)
        dim = options.dim
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for m, d in dims.items()})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in dims})
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # 1-D: FSDP shards no scalars
        # the contrastive temperature trains only where a contrastive loss can use it
        self.logit_scale.requires_grad_(bool(options.contrastive_weight) and len(dims) > 1)
        if options.kind == "attention":
            self.cls = nn.Parameter(torch.randn(dim) * 0.02)
            self.type_embedding = nn.Parameter(torch.randn(len(dims), dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, options.heads, dim * 2, options.dropout, batch_first=True,
                                               norm_first=True)
            self.mixer: nn.Module = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
        else:
            self.mixer = nn.Sequential(nn.Linear(dim * len(dims), dim), nn.GELU(), nn.Dropout(options.dropout),
                                       nn.LayerNorm(dim))
        self.out_dim = dim

    def plait_blocks(self) -> list[nn.Module]:
        """The attention fusion's transformer layers: FSDP units and checkpointed blocks."""
        return list(self.mixer.layers) if isinstance(self.mixer, nn.TransformerEncoder) else []

    def plait_tensor_parallel(self, tp: int) -> dict[str, Any]:
        """The attention fusion's layers split by heads and feed-forward units (``transformer_plan``); the
        projections, the concat fusion and the head stay whole."""
        if not isinstance(self.mixer, nn.TransformerEncoder):
            return {}
        plan = transformer_plan(self.mixer, tp, "the fusion (plugins.fusion.heads)")
        return {f"mixer.{name}": style for name, style in plan.items()}

    def _drop_modalities(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hide modalities at random, but never all of a sample's."""
        stacked = torch.stack([present[m] for m in self.modalities], dim=1)
        kept = stacked & (torch.rand(stacked.shape, device=stacked.device) >= self.options.modality_dropout)
        # a sample that lost everything keeps one of its modalities, chosen at random
        pick = (torch.rand(stacked.shape, device=stacked.device) + 1) * stacked  # 0 where absent
        one = nn.functional.one_hot(pick.argmax(dim=1), stacked.shape[1]).bool() & stacked
        kept = torch.where(kept.any(dim=1, keepdim=True), kept, one)
        return {m: kept[:, i] for i, m in enumerate(self.modalities)}

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> dict:
        used = self._drop_modalities(present) if self.training and self.options.modality_dropout else present
        projected = {m: self.project[m](embeddings[m]) for m in self.modalities}
        tokens = [torch.where(used[m].unsqueeze(1), projected[m], self.missing[m].to(projected[m].dtype))
                  for m in self.modalities]
        if self.options.kind == "attention":
            seq = torch.stack(tokens, dim=1) + self.type_embedding
            cls = self.cls.expand(seq.shape[0], 1, -1).to(seq.dtype)
            fused = self.norm(self.mixer(torch.cat([cls, seq], dim=1))[:, 0])
        else:
            fused = self.mixer(torch.cat(tokens, dim=1))
        return {"fused": fused, "projected": projected, "present": present,
                "logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()}


class Head(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.layers(fused)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned embeddings (CLIP)."""
    logits = scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def contrastive_loss(outputs: dict) -> torch.Tensor | None:
    """Mean InfoNCE over modality pairs, on the samples that have both (None if none do)."""
    losses = []
    for a, b in itertools.combinations(sorted(outputs["projected"]), 2):
        both = outputs["present"][a] & outputs["present"][b]
        if int(both.sum()) >= 2:
            projected = outputs["projected"]
            losses.append(info_nce(projected[a][both], projected[b][both], outputs["logit_scale"]))
    return torch.stack(losses).mean() if losses else None


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every worker's rows of ``tensor``, by rank, with gradients flowing back to each worker's own (padded to
    the largest worker's rows), and where this worker's start."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    every = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(every, sizes)
    most = int(max(int(size) for size in every))
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, most - tensor.shape[0]))
    return torch.cat(all_gather(padded), dim=0), dist.get_rank() * most


def gathered_contrastive_loss(outputs: dict) -> torch.Tensor | None:
    """``contrastive_loss`` over every worker's batch together (OpenCLIP's local loss with gather-with-grad):
    each worker scores its own rows against all rows. Its loss is ``world_size`` times its rows' share of
    the global sum, so that DDP's average of the workers' gradients is the gradient of the one-process loss
    over the concatenated batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return contrastive_loss(outputs)
    world, rows = dist.get_world_size(), next(iter(outputs["present"].values())).shape[0]
    present, projected, start = {}, {}, 0
    for m in sorted(outputs["projected"]):
        projected[m], start = gather_rows(outputs["projected"][m].float())
        present[m] = gather_rows(outputs["present"][m].float().unsqueeze(1))[0].squeeze(1) > 0.5
    mine = torch.zeros_like(present[next(iter(present))])
    mine[start:start + rows] = True
    losses = []
    for a, b in itertools.combinations(sorted(projected), 2):
        both = present[a] & present[b]
        total = int(both.sum())
        if total < 2:
            continue
        left, right = F.normalize(projected[a][both], dim=-1), F.normalize(projected[b][both], dim=-1)
        own = mine[both]
        targets = torch.arange(total, device=left.device)[own]
        scale = outputs["logit_scale"]
        summed = (F.cross_entropy(scale * left[own] @ right.T, targets, reduction="sum")
                  + F.cross_entropy(scale * right[own] @ left.T, targets, reduction="sum"))
        losses.append(0.5 * summed * world / total)
    return torch.stack(losses).mean() if losses else None


@hookimpl
def plait_config_schema():
    return FusionOptions


@hookimpl
def plait_build_fusion(config, dims):
    return Fusion(config.options(FusionOptions), dims)


@hookimpl
def plait_build_head(config, in_dim, num_classes):
    return Head(in_dim, num_classes, config.options(FusionOptions).dropout)


@hookimpl
def plait_parameter_groups(model, config):
    options = config.options(FusionOptions)
    groups = []
    fusion, head = part_of(model, Fusion, "fusion"), part_of(model, Head, "head")
    if fusion is not None:
        groups.append(options.group("fusion", fusion))
    if head is not None:
        groups.append(options.head.group("head", head))
    return groups


@hookimpl
def plait_loss_terms(state, batch, outputs):
    options = state.config.options(FusionOptions)
    terms = {"ce": options.ce_weight * F.cross_entropy(outputs["logits"].float(), batch["label"],
                                                       label_smoothing=options.label_smoothing)}
    if options.contrastive_weight:
        contrastive = (gathered_contrastive_loss if options.contrastive_gather else contrastive_loss)(outputs)
        if contrastive is not None:
            terms["contrastive"] = options.contrastive_weight * contrastive
        else:  # no pair in this batch: the temperature still takes part (a zero gradient), so DDP
            # needs no search for unused parameters
            terms["ce"] = terms["ce"] + 0.0 * outputs["logit_scale"].sum()
    return terms
