"""Image encoder: any timm model by name, built from its config or with its weights from a local file
(``timm_file``), or any transformers vision model folder (``pretrained``: ViT, CLIP's vision tower, ...)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import timm
import torch
from pydantic import Field, field_validator
from torch import nn

from plait.core.errors import nearest
from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.modalities.image import match_channels
from plait.modalities.pretrained import hf_processor_config, load_hf_model, timm_weights, transformer_layers


class ImageEncoderOptions(TrainingControl):
    timm: str = Field("resnet18", description="a timm model name (`timm.list_models()`)")
    in_chans: int = Field(1, ge=1)
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    timm_file: str | None = Field(None, description="a local safetensors (or .pth) file of the timm model's "
                                  "pretrained weights")
    pretrained: str | None = Field(None, description="a local transformers vision model folder (ViTModel, "
                                   "CLIPModel or CLIPVisionModel, ...): used instead of timm")

    @field_validator("timm")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model{nearest(name, timm.list_models())}")
        return name


class ImageEncoder(nn.Module):
    def __init__(self, options: ImageEncoderOptions) -> None:
        super().__init__()
        kwargs = {"num_classes": 0, "in_chans": options.in_chans, **options.timm_kwargs}
        if options.timm_file:
            self.model = timm_weights(options.timm, options.timm_file, "plugins.image_encoder.timm_file", **kwargs)
        else:
            self.model = timm.create_model(options.timm, pretrained=False, **kwargs)
        self.in_chans = options.in_chans
        self.out_dim = self.model.num_features

    def plait_save_native(self, folder: Path) -> None:
        """timm's own layout: ``model.safetensors`` and ``config.json`` with the ``pretrained_cfg``, which
        ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": ...})`` reads."""
        from timm.models import save_for_hf

        save_for_hf(self.model, str(folder), safe_serialization=True)

    def plait_blocks(self) -> list[nn.Module]:
        """The timm model's stages: ``stages`` (ConvNeXt, RegNet...), ``blocks`` (EfficientNet, ViT...), or
        ResNet's ``layer1`` to ``layer4``."""
        for name in ("stages", "blocks"):
            found = getattr(self.model, name, None)
            if isinstance(found, (nn.Sequential, nn.ModuleList)) and len(found) > 1:
                return list(found)
        return [m for m in (getattr(self.model, f"layer{i}", None) for i in range(1, 5)) if isinstance(m, nn.Module)]

    def forward(self, inputs: dict) -> torch.Tensor:
        # Grayscale or RGB files, whichever the data set loaded, become what this model takes.
        return self.model(match_channels(inputs["image"], self.in_chans))


class HFImageEncoder(nn.Module):
    """A transformers vision model: images resized to its size and normalised by its processor's mean and
    std; the output is the pooled image embedding (CLIP's post-layernorm CLS, ViT's CLS, a CNN's pool)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        model = load_hf_model(folder, "plugins.image_encoder.pretrained")
        model = getattr(model, "vision_model", model)  # a whole CLIP: its vision tower
        if getattr(model, "pooler", None) is not None and not hasattr(model, "post_layernorm"):
            model.pooler = None  # ViT's tanh pooler: the CLS token is the embedding; no unused weights under DDP
        self.model = model
        config = model.config
        self.in_chans = int(getattr(config, "num_channels", 3))
        size = getattr(config, "image_size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        processor = hf_processor_config(folder)
        mean = processor.get("image_mean", [0.5] * self.in_chans)
        std = processor.get("image_std", [0.5] * self.in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        with torch.no_grad():
            self.out_dim = int(self._embed(torch.zeros(1, self.in_chans, *self.size)).shape[-1])

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(2, 3))

    def plait_blocks(self) -> list[nn.Module]:
        """The transformer layers: FSDP units and checkpointed blocks."""
        return transformer_layers(self.model)

    def plait_save_native(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))

    def forward(self, inputs: dict) -> torch.Tensor:
        images = match_channels(inputs["image"], self.in_chans)
        if tuple(images.shape[-2:]) != self.size:
            images = nn.functional.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
        return self._embed((images - mean) / std)


@hookimpl
def plait_config_schema():
    return ImageEncoderOptions


@hookimpl
def plait_build_encoder(modality, config):
    if modality != "image":
        return None
    options = config.options(ImageEncoderOptions)
    return HFImageEncoder(options.pretrained) if options.pretrained else ImageEncoder(options)


@hookimpl
def plait_parameter_groups(model, config):
    encoder = part_of(model, (ImageEncoder, HFImageEncoder), "encoders", "image")
    return [config.options(ImageEncoderOptions).group("image", encoder)] if encoder is not None else None
