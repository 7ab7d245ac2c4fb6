"""LoRA and DoRA adapters (the ``peft`` library) on named modules of any tower or the fusion; QLoRA with the
base's linear weights in 4-bit NF4 (torchao's ``NF4Tensor``, as torchtune uses it).

The parts of the model that hold a target (``encoders.text``, ``fusion``, ...) are frozen but for their
adapters; the other parts train as their own options say. Checkpoints leave the frozen base out
(``plait_rebuilt_weights``): it is rebuilt from the config (a pretrained folder, or the seed), and its
digest, kept in the plugin's state, makes a resume on another base an error. ``plait export --format hf``
merges the adapters into the base (``plait_export_model``).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Literal

from pydantic import Field
from torch import nn

from plait.core.checkpoint import weights_digest
from plait.core.config import Options
from plait.core.errors import ConfigError, nearest
from plait.core.hookspecs import hookimpl
from plait.core.stash import StashKey

log = logging.getLogger("plait")

#: Module kinds peft's LoRA adapts.
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
NF4_BLOCK = 64  # torchao's NF4 block size: a weight quantizes when its size is a multiple of it; its scales
# are quantized again in blocks of 256 (QLoRA's double quantization), or fewer for small weights


class LoraOptions(Options):
    targets: list[str] = Field(
        default_factory=lambda: ["encoders.text.*.query", "encoders.text.*.value"],
        description="module name patterns (fnmatch, over the model's module names, such as "
        "encoders.text.model.encoder.layer.0.attention.self.query): each must match at least one linear, "
        "convolution or embedding")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    dora: bool = Field(False, description="weight-decomposed adapters (DoRA): a trained magnitude per output")
    quantize_base: Literal["none", "nf4"] = Field(
        "none", description="nf4: QLoRA, the frozen base's linear weights held in 4-bit NormalFloat (torchao)")


class _Adapted:
    """What the plugin knows of one run's adapted model (in ``plugins.stash``)."""

    def __init__(self, digest: str, sources: dict[str, str]) -> None:
        self.digest = digest
        self.sources = sources


ADAPTED = StashKey[_Adapted]()


def _parts(targets: list[str]) -> list[str]:
    """The parts of the model that hold the targets: ``encoders.NAME``, or a top-level module."""
    parts = []
    for name in targets:
        pieces = name.split(".")
        part = ".".join(pieces[:2]) if pieces[0] == "encoders" and len(pieces) > 1 else pieces[0]
        if part not in parts:
            parts.append(part)
    return parts


def _targets(model: nn.Module, patterns: list[str]) -> list[str]:
    candidates = [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]
    chosen: list[str] = []
    for pattern in patterns:
        found = [name for name in candidates if fnmatch.fnmatchcase(name, pattern)]
        if not found:
            raise ConfigError(f"plugins.lora.targets: '{pattern}' matches no linear, convolution or embedding of "
                              f"the model{nearest(pattern, candidates)} ({len(candidates)} modules could be adapted)")
        chosen += [name for name in found if name not in chosen]
    return chosen


def _in(name: str, parts: list[str]) -> bool:
    return any(name == part or name.startswith(f"{part}.") for part in parts)


def _quantize_base(model: nn.Module, parts: list[str]) -> int:
    """The linear weights of the adapted parts as frozen NF4 tensors; the number quantized."""
    from torchao.quantization import NF4Tensor

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _in(name, parts) and module.weight.numel() % NF4_BLOCK == 0:
            blocks = module.weight.numel() // NF4_BLOCK
            scaler_block = next(size for size in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % size == 0)
            quantized = NF4Tensor.from_tensor(module.weight.detach(), NF4_BLOCK, scaler_block)
            module.weight = nn.Parameter(quantized, requires_grad=False)
            count += 1
    return count


@hookimpl
def plait_config_schema():
    return LoraOptions


@hookimpl
def plait_configure_model(model, config, plugins):
    options = config.options(LoraOptions)
    if config.scaling.tensor_parallel > 1:
        raise ConfigError(f"{config.source}: plugins.lora with scaling.tensor_parallel: adapters on split "
                          "matrices are not supported; use data parallelism (ddp or fsdp)")
    from peft import LoraConfig, inject_adapter_in_model

    targets = _targets(model, options.targets)
    parts = _parts(targets)
    was_trained = {name: param.requires_grad for name, param in model.named_parameters() if not _in(name, parts)}
    base = {name: value for name, value in model.state_dict().items() if _in(name, parts)}
    sources = {name: module.plait_pretrained for name, module in model.named_modules()
               if _in(name, parts) and isinstance(getattr(module, "plait_pretrained", None), str)}
    adapted = _Adapted(weights_digest(base), sources)
    plugins.stash[ADAPTED] = adapted
    quantized = _quantize_base(model, parts) if options.quantize_base == "nf4" else 0
    lora = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=targets, use_dora=options.dora)
    model = inject_adapter_in_model(lora, model)
    for name, param in model.named_parameters():  # peft froze all else; the parts it does not adapt train on
        if name in was_trained:
            param.requires_grad_(was_trained[name])
    model.plait_rebuilt_weights = frozenset(
        name for name, param in model.named_parameters() if _in(name, parts) and not param.requires_grad
    ) | frozenset(name for name, _ in model.named_buffers() if _in(name, parts))
    trainable = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and _in(name, parts))
    log.info("lora: %d %s adapters (rank %d) on %s; %s trainable parameters there; base digest %s%s",
             len(targets), "DoRA" if options.dora else "LoRA", options.rank, ", ".join(parts), f"{trainable:,}",
             adapted.digest[:12], f"; {quantized} linear weights in NF4" if quantized else "")
    return model


@hookimpl
def plait_state_dict(state):
    adapted = state.plugins.stash[ADAPTED]
    return {"base_digest": adapted.digest, "base": adapted.sources}


@hookimpl
def plait_load_state_dict(state, data):
    adapted = state.plugins.stash[ADAPTED]
    if data["base_digest"] != adapted.digest:
        saved = ", ".join(f"{part}: {folder}" for part, folder in data.get("base", {}).items()) or "built from config"
        now = ", ".join(f"{part}: {folder}" for part, folder in adapted.sources.items()) or "built from config"
        raise ConfigError(f"{state.config.source}: plugins.lora: the checkpoint's adapters were trained on another "
                          f"base (digest {data['base_digest'][:12]}, {saved}) than this config builds (digest "
                          f"{adapted.digest[:12]}, {now}); resume with the same base, or start a new run.name")


def _dequantized(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if weight is not None and type(weight).__name__ == "NF4Tensor":
        module.weight = nn.Parameter(weight.get_original_weight(), requires_grad=False)


@hookimpl
def plait_export_model(model, config):
    """Each adapter merged into its base layer, which takes the adapter's place: a plain model again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for module in model.modules():  # QLoRA: every NF4 weight back to float, adapted or not
        if isinstance(module, nn.Linear):
            _dequantized(module)
    for name, layer in adapters:
        base: Any = layer.get_base_layer()
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if hasattr(model, "plait_rebuilt_weights"):
        del model.plait_rebuilt_weights
    return model
