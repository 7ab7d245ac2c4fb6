"""Audio encoder: log-mel front end (torchaudio), SpecAugment, and a small 2-D CNN with
attention and max pooling over time, so leading and trailing silence do not dilute the word; or a
transformers audio encoder folder (``pretrained``: wav2vec2 or HuBERT on the waveform, Whisper's encoder
on its log-mel features), mean-pooled over the frames of the real audio."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from plait.core.hookspecs import hookimpl
from plait.core.model import part_of
from plait.core.optim import TrainingControl
from plait.modalities.audio import SAMPLE_RATE, LogMel, SpecAugment
from plait.modalities.pretrained import hf_processor_config, load_hf_model, masked_frames_mean, transformer_layers


class AudioEncoderOptions(TrainingControl):
    pretrained: str | None = Field(None, description="a local transformers audio model folder (wav2vec2, HuBERT, "
                                   "Whisper): used instead of the CNN")
    n_mels: int = Field(40, ge=16)
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])
    dim: int = Field(128, ge=8)
    spec_augment: bool = Field(True, description="training-only frequency warp and masks")
    freq_warp: float = Field(0.12, ge=0, lt=0.5, description="max relative stretch of the mel axis")
    spec_masks: int = Field(0, ge=0, description="frequency and time masks per utterance")
    dropout: float = Field(0.1, ge=0, lt=1)


class MaskedBlocks(nn.Sequential):
    """The CNN's blocks, each one's output zeroed past the clip's end (``frames``: [B, 1, T], 1 for a real
    frame), so that the next block's convolution reads zeros there as it reads its own padding. Called as
    one module, so that its output can be named (``encoders.audio.cnn``, e.g. for distillation)."""

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        for block in self:
            frames = nn.functional.max_pool1d(frames, 2)
            x = block(x) * frames.unsqueeze(1)
        return x, frames


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
        self.cnn = MaskedBlocks(*blocks)
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
        # Frames to a multiple of what the poolings halve away, and each block's output zeroed past the clip's
        # end: a clip's features are then what they would be alone, whatever longer clips share its batch.
        short = -spec.shape[-1] % 2 ** self.pools
        spec, mask = nn.functional.pad(spec, (0, short)), nn.functional.pad(mask, (0, short))
        x, frames = self.cnn(self.augment(spec).unsqueeze(1), mask.float().unsqueeze(1))
        features = x.mean(dim=2)  # [B, C, T']
        mask = frames > 0
        weights = self.attend(features).masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        mean = (features * weights).sum(-1)
        peak = features.masked_fill(~mask, float("-inf")).amax(-1)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        return self.proj(torch.cat([mean, peak], dim=1))


class HFAudioEncoder(nn.Module):
    """A transformers audio encoder on 16 kHz waveforms, fed as its processor config says: wav2vec2 and HuBERT
    take the waveform (normalised per utterance where ``do_normalize``), Whisper's encoder its log-mel
    features (``WhisperFeatureExtractor``, padded to its 30 s, or whatever the folder's config sets)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        model = load_hf_model(folder, "plugins.audio_encoder.pretrained")
        self.whisper = model.config.model_type == "whisper"
        self.features = None
        if self.whisper:
            from transformers import WhisperFeatureExtractor

            self.features = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
            model = model.get_encoder()
        self.model = model
        processor = hf_processor_config(folder)
        self.normalize = bool(processor.get("do_normalize", True))
        self.uses_mask = getattr(model.config, "feat_extract_norm", "layer") == "layer"
        self.out_dim = int(model.config.d_model if self.whisper else model.config.hidden_size)

    def plait_blocks(self) -> list[nn.Module]:
        """The transformer layers: FSDP units and checkpointed blocks."""
        return transformer_layers(self.model)

    def plait_save_native(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))
        if self.features is not None:
            self.features.save_pretrained(str(folder))

    def forward(self, inputs: dict) -> torch.Tensor:
        waves, lengths = inputs["audio"], inputs["lengths"]
        device = next(self.model.parameters()).device
        if self.whisper:
            assert self.features is not None
            clips = [wave[: int(n)].cpu().numpy() for wave, n in zip(waves, lengths, strict=True)]
            features = self.features(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            hidden = self.model(input_features=features.to(device)).last_hidden_state
            frames = (lengths // self.features.hop_length + 1) // 2  # the encoder's stride-2 convolution
            return masked_frames_mean(hidden, frames.clamp(min=1, max=hidden.shape[1]))
        mask = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
        if self.normalize:  # zero mean, unit variance over each clip's real samples (Wav2Vec2FeatureExtractor)
            count = lengths.clamp(min=1).unsqueeze(1).to(waves.dtype)
            mean = (waves * mask).sum(1, keepdim=True) / count
            var = (((waves - mean) * mask) ** 2).sum(1, keepdim=True) / count
            waves = ((waves - mean) / torch.sqrt(var + 1e-7)) * mask
        attention = mask.long() if self.uses_mask else None
        hidden = self.model(input_values=waves, attention_mask=attention).last_hidden_state
        frames = self.model._get_feat_extract_output_lengths(lengths)
        return masked_frames_mean(hidden, frames.clamp(min=1, max=hidden.shape[1]))


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
    if modality != "audio":
        return None
    options = config.options(AudioEncoderOptions)
    return HFAudioEncoder(options.pretrained) if options.pretrained else AudioEncoder(options)


@hookimpl
def plait_parameter_groups(model, config):
    encoder = part_of(model, (AudioEncoder, HFAudioEncoder), "encoders", "audio")
    return [config.options(AudioEncoderOptions).group("audio", encoder)] if encoder is not None else None
