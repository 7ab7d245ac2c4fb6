"""Image encoder: any timm model by name, built from its config (``pretrained=False``)."""
from __future__ import annotations

from typing import Any

import timm
import torch
from pydantic import Field, field_validator
from torch import nn

from plait.core.errors import nearest
from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.modalities.image import match_channels


class ImageEncoderOptions(TrainingControl):
    timm: str = Field("resnet18", description="a timm model name (`timm.list_models()`)")
    in_chans: int = Field(1, ge=1)
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timm")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model{nearest(name, timm.list_models())}")
        return name


class ImageEncoder(nn.Module):
    def __init__(self, options: ImageEncoderOptions) -> None:
        super().__init__()
        self.model = timm.create_model(
            options.timm, pretrained=False, num_classes=0, in_chans=options.in_chans, **options.timm_kwargs
        )
        self.in_chans = options.in_chans
        self.out_dim = self.model.num_features

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


@hookimpl
def plait_config_schema():
    return ImageEncoderOptions


@hookimpl
def plait_build_encoder(modality, config):
    if modality == "image":
        return ImageEncoder(config.options(ImageEncoderOptions))
    return None


@hookimpl
def plait_parameter_groups(model, config):
    encoder = part_of(model, ImageEncoder, "encoders", "image")
    return [config.options(ImageEncoderOptions).group("image", encoder)] if encoder is not None else None
