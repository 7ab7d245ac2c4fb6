"""Training-time augmentation for every data set: waveform (speed, room, band, noise,
gain), image (affine jitter, noise) and text (typos, dropped words). Validation and test are untouched."""
from __future__ import annotations

import random

import torch
from pydantic import Field

from plait.core.config import Options
from plait.core.hookspecs import hookimpl
from plait.modalities.audio import WaveAugment
from plait.modalities.image import ImageAugment
from plait.modalities.text import add_typos, drop_words


class AugmentOptions(Options):
    audio: float = Field(0.8, ge=0, le=1, description="chance to augment a waveform")
    image: float = Field(0.8, ge=0, le=1, description="chance to augment an image")
    text_typo_rate: float = Field(0.03, ge=0, lt=1)
    text_word_dropout: float = Field(0.0, ge=0, lt=1, description="chance to leave out each word of a text "
                                     "(one is always kept): a view the label may no longer fit, which a teacher "
                                     "scores for what it still says")


class SampleAugment:
    """Picklable: runs in DataLoader and Ray workers. Randomness comes from torch's RNG, which plait
    seeds per sample and view: the same view of a sample is the same wherever it is decoded."""

    def __init__(self, options: AugmentOptions) -> None:
        self.options = options
        self.wave = WaveAugment(p=1.0)
        self.image = ImageAugment()

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        if sample.get("audio") is not None and torch.rand(()) < self.options.audio:
            sample["audio"] = self.wave(sample["audio"])
        if sample.get("image") is not None and torch.rand(()) < self.options.image:
            sample["image"] = self.image(sample["image"])
        if sample.get("text") and (self.options.text_typo_rate or self.options.text_word_dropout):
            rng = random.Random(int(torch.randint(2**31, ())))
            text = drop_words(sample["text"], rng, self.options.text_word_dropout)
            sample["text"] = add_typos(text, rng, self.options.text_typo_rate)
        return sample


@hookimpl
def plait_config_schema():
    return AugmentOptions


@hookimpl
def plait_sample_transforms(config, split):
    if split != "train":
        return None
    return [SampleAugment(config.options(AugmentOptions))]
