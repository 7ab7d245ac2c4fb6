"""Audio encoder: log-mel front end (torchaudio), SpecAugment, and a small 2-D CNN with
attention and max pooling over time, so leading and trailing silence do not dilute the word."""
from __future__ import annotations

import re

import torch
from pydantic import Field
from torch import nn

from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.modalities.audio import LogMel, SpecAugment


class AudioEncoderOptions(TrainingControl):
    n_mels: int = Field(40, ge=16)
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])
    dim: int = Field(128, ge=8)
    spec_augment: bool = Field(True, description="training-only frequency warp and masks")
    freq_warp: float = Field(0.12, ge=0, lt=0.5, description="max relative stretch of the mel axis")
    spec_masks: int = Field(0, ge=0, description="frequency and time masks per utterance")
    dropout: float = Field(0.1, ge=0, lt=1)


class AudioEncoder(nn.Module):
    def __init__(self, options: AudioEncoderOptions) -> None:
        super().__init__()
        self.front = LogMel(n_mels=options.n_mels)
        self.augment = (SpecAugment(warp=options.freq_warp, masks=options.spec_masks) if options.spec_augment
                        else nn.Identity())
        blocks, c_in = [], 1
        for c_out in options.channels:
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c_out
        self.cnn = nn.Sequential(*blocks)
        self.register_load_state_dict_pre_hook(_flat_cnn_names)
        self.pools = len(options.channels)
        self.attend = nn.Conv1d(c_in, 1, 1)
        self.proj = nn.Sequential(nn.Dropout(options.dropout), nn.Linear(2 * c_in, options.dim))
        self.out_dim = options.dim

    def plait_blocks(self) -> list[nn.Module]:
        """The CNN's blocks (convolution, batch norm, ReLU, pooling): FSDP units and checkpointed blocks."""
        return list(self.cnn)

    def forward(self, inputs: dict) -> torch.Tensor:
        spec, mask = self.front(inputs["audio"], inputs["lengths"])
        short = 2 ** self.pools - spec.shape[-1]
        if short > 0:  # fewer frames than the CNN's poolings halve away (clips under ~0.15 s)
            spec, mask = nn.functional.pad(spec, (0, short)), nn.functional.pad(mask, (0, short))
        features = self.cnn(self.augment(spec).unsqueeze(1)).mean(dim=2)  # [B, C, T']
        for _ in range(self.pools):
            mask = nn.functional.max_pool1d(mask.float().unsqueeze(1), 2).squeeze(1)
        mask = mask[:, : features.shape[-1]].unsqueeze(1) > 0
        weights = self.attend(features).masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        mean = (features * weights).sum(-1)
        peak = features.masked_fill(~mask, float("-inf")).amax(-1)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        return self.proj(torch.cat([mean, peak], dim=1))


def _flat_cnn_names(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Weights saved before the CNN was grouped into blocks: ``cnn.5.weight`` is ``cnn.1.1.weight``."""
    flat = re.compile(rf"^{re.escape(prefix)}cnn\.(\d+)\.(?=[^.]+$)")
    for key, found in [(k, flat.match(k)) for k in state_dict]:
        if found:
            index = int(found.group(1))
            state_dict[flat.sub(f"{prefix}cnn.{index // 4}.{index % 4}.", key)] = state_dict.pop(key)


@hookimpl
def plait_config_schema():
    return AudioEncoderOptions


@hookimpl
def plait_build_encoder(modality, config):
    if modality == "audio":
        return AudioEncoder(config.options(AudioEncoderOptions))
    return None


@hookimpl
def plait_parameter_groups(model, config):
    encoder = part_of(model, AudioEncoder, "encoders", "audio")
    return [config.options(AudioEncoderOptions).group("audio", encoder)] if encoder is not None else None
