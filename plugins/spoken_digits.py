"""spoken_digits: a built-in three-modality data set that needs no download.

- image: real handwritten digits (scikit-learn's bundled 8x8 digits, upscaled to 32x32);
- audio: the digit's name spoken by espeak-ng (``plait.modalities.speech``, in a child
  process) in several languages, with varied voices, speed, pitch and intonation;
  validation and test use voice variants that training never hears;
- text: the digit's name in one of those languages, with typos and case noise.

Each modality of a sample is, independently, clean, corrupted (unreadable) or missing,
and every sample keeps at least one clean modality: no single modality suffices, the
fused model can be right on nearly every sample. Everything derives from ``seed``;
the synthesized audio is cached (``$PLAIT_CACHE`` or ~/.cache/plait).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import zipfile
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from pydantic import Field, field_validator
from torch.utils.data import Dataset

from plait.core.config import Options
from plait.core.files import replaced_atomically
from plait.core.hookspecs import hookimpl
from plait.modalities import MODALITIES
from plait.modalities.audio import add_noise, resample, trim_silence
from plait.modalities.batch import collate
from plait.modalities.speech import Utterance, speak, voice_variants
from plait.modalities.text import add_typos, random_case

WORDS = {
    "en": "zero one two three four five six seven eight nine",
    "de": "null eins zwei drei vier fünf sechs sieben acht neun",
    "fr": "zéro un deux trois quatre cinq six sept huit neuf",
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve",
    "nl": "nul een twee drie vier vijf zes zeven acht negen",
    "pt": "zero um dois três quatro cinco seis sete oito nove",
    "it": "zero uno due tre quattro cinque sei sette otto nove",
    "sv": "noll ett två tre fyra fem sex sju åtta nio",
}
# espeak-ng voices (accents) per language; each rendering picks one.
ACCENTS = {
    "en": ["en-US", "en", "en-GB-scotland", "en-GB-x-rp", "en-029", "en-US-nyc", "en-GB-x-gbclan"],
    "de": ["de"], "fr": ["fr", "fr-BE", "fr-CH"], "es": ["es", "es-419"], "nl": ["nl"],
    "pt": ["pt", "pt-BR"], "it": ["it"], "sv": ["sv"],
}
SPLITS = ("train", "val", "test")
CACHE_VERSION = 3  # 3: every clip seeded (espeak-ng's noise was time-seeded)


class SpokenDigitsOptions(Options):
    languages: list[str] = Field(default_factory=lambda: list(WORDS))
    train_size: int = Field(6000, ge=10)
    val_size: int = Field(1000, ge=10)
    test_size: int = Field(2000, ge=10)
    renderings: int = Field(30, ge=1, description="train audio clips per language and digit")
    eval_renderings: int = Field(8, ge=1, description="val/test audio clips per language and digit")
    p_missing: float = Field(0.25, ge=0, lt=1)
    p_corrupt: float = Field(0.15, ge=0, lt=1)
    typo_rate: float = Field(0.06, ge=0, lt=1)
    seed: int = 0
    cache_dir: str | None = None

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, languages: list[str]) -> list[str]:
        unknown = [lang for lang in languages if lang not in WORDS]
        if unknown or not languages:
            raise ValueError(f"languages must be a non-empty subset of {sorted(WORDS)}; unknown: {unknown}")
        return languages


# ------------------------------------------------------------------ building
def _voice_split(variants: list[str], seed: int) -> dict[str, list[str]]:
    """Voice variants for training, and disjoint ones for validation and test."""
    shuffled = variants[:]
    random.Random(seed).shuffle(shuffled)
    cut = len(shuffled) * 7 // 10
    held_out = shuffled[cut:]
    return {"train": shuffled[:cut], "val": held_out[::2], "test": held_out[1::2]}


def _synthesize(options: SpokenDigitsOptions) -> dict[str, np.ndarray]:
    voices = _voice_split(voice_variants(), options.seed)
    rng = random.Random(options.seed)
    jobs = []
    for split in SPLITS:
        count = options.renderings if split == "train" else options.eval_renderings
        for lang in options.languages:
            for digit, word in enumerate(WORDS[lang].split()):
                jobs += [(split, lang, digit, word)] * count
    utterances = [Utterance(word, f"{rng.choice(ACCENTS[lang])}+{rng.choice(voices[split])}",
                            rng.randint(110, 230), rng.randint(15, 85), rng.randint(20, 90), seed=rng.randrange(2**31))
                  for split, lang, digit, word in jobs]
    rate, raw = speak(utterances, progress=f"spoken_digits: synthesizing {len(jobs)} clips (once; cached)")
    waves = [trim_silence(resample(torch.from_numpy(wave), rate)).numpy() for wave in raw]
    offsets = np.cumsum([0] + [len(w) for w in waves])
    return {"clips": np.concatenate(waves).astype(np.float32), "clip_offsets": offsets,
            "clip_labels": np.array([job[2] for job in jobs]),
            "clip_splits": np.array([SPLITS.index(job[0]) for job in jobs])}


def _image_pools(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's digits: images [N, 8, 8] in 0..16, labels, and a split index per image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    split = np.empty(len(order), dtype=np.int64)
    split[order[: len(order) * 6 // 10]] = 0
    split[order[len(order) * 6 // 10: len(order) * 8 // 10]] = 1
    split[order[len(order) * 8 // 10:]] = 2
    return digits.images.astype(np.float32), digits.target, split


def _sample_table(options: SpokenDigitsOptions, split: str, clip_labels, clip_splits, image_labels,
                  image_splits) -> dict[str, np.ndarray]:
    """Which image, clip and text each sample has, and the state of each modality:
    0 clean, 1 corrupted, 2 missing."""
    index = SPLITS.index(split)
    size = {"train": options.train_size, "val": options.val_size, "test": options.test_size}[split]
    rng = np.random.default_rng([options.seed, index])
    text_rng = random.Random(options.seed * 3 + index)
    clips_by_digit = [np.flatnonzero((clip_labels == d) & (clip_splits == index)) for d in range(10)]
    images_by_digit = [np.flatnonzero((image_labels == d) & (image_splits == index)) for d in range(10)]
    labels = rng.integers(0, 10, size)
    p = [1 - options.p_missing - options.p_corrupt, options.p_corrupt, options.p_missing]
    modality_state = rng.choice(3, size=(size, len(MODALITIES)), p=p)
    for row in np.flatnonzero((modality_state != 0).all(axis=1)):  # keep one clean modality
        modality_state[row, rng.integers(len(MODALITIES))] = 0
    texts = []
    for label in labels:
        lang = text_rng.choice(options.languages)
        word = WORDS[lang].split()[label]
        texts.append(random_case(add_typos(word, text_rng, options.typo_rate), text_rng))
    return {
        "labels": labels,
        "state": modality_state,
        "images": np.array([rng.choice(images_by_digit[d]) for d in labels]),
        "clips": np.array([rng.choice(clips_by_digit[d]) for d in labels]),
        "texts": np.array(texts),
        "seeds": rng.integers(0, 2**31, size),
    }


@functools.lru_cache(maxsize=1)
def _read_cache(path: str) -> dict[str, np.ndarray]:
    """Read once per process: the train, val and test splits share the clips."""
    with np.load(path, allow_pickle=False) as data:
        return dict(data)


AUDIO_KEYS = ("languages", "renderings", "eval_renderings", "seed")


def cache_path(options: SpokenDigitsOptions) -> Path:
    """Where the synthesized clips live; only the options that shape the audio key it."""
    root = Path(options.cache_dir or os.environ.get("PLAIT_CACHE") or Path.home() / ".cache" / "plait")
    spec = options.model_dump(include=set(AUDIO_KEYS)) | {"version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"spoken_digits-{digest}.npz"


def load_clips(options: SpokenDigitsOptions) -> dict[str, np.ndarray]:
    """The synthesized clips, from the cache or synthesized (and cached) now. A lock makes one
    process synthesize while the others on this machine (Ray Train workers) wait and read."""
    path = cache_path(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        if path.exists():
            try:
                return _read_cache(str(path))
            except (OSError, ValueError, zipfile.BadZipFile):
                path.unlink()  # a damaged cache is rebuilt, not trusted
        arrays = _synthesize(options)
        with replaced_atomically(path) as tmp:
            np.savez(tmp, **cast(dict[str, Any], arrays))
    return arrays


# ------------------------------------------------------------------- dataset
class SpokenDigits(Dataset):
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]
    modalities = MODALITIES
    collate_fn = staticmethod(collate)

    def __init__(self, options: SpokenDigitsOptions, split: str) -> None:
        clips = load_clips(options)
        images, image_labels, image_splits = _image_pools(options.seed)
        self.images = F.interpolate(torch.from_numpy(images / 16.0).unsqueeze(1), size=(32, 32), mode="bilinear",
                                    align_corners=False)
        self.clips, self.offsets = torch.from_numpy(clips["clips"]), clips["clip_offsets"]
        self.table = _sample_table(options, split, clips["clip_labels"], clips["clip_splits"], image_labels,
                                   image_splits)
        self.split = split
        self.info = {"image_shape": [1, 32, 32], "languages": options.languages}

    def __len__(self) -> int:
        return len(self.table["labels"])

    def __getitem__(self, index: int) -> dict:
        state = self.table["state"][index]
        generator = torch.Generator().manual_seed(int(self.table["seeds"][index]))
        sample: dict = {"id": f"{self.split}-{index}", "label": int(self.table["labels"][index])}
        for column, modality in enumerate(MODALITIES):
            if state[column] == 2:
                sample[modality] = None
                continue
            value = self._clean(modality, index)
            sample[modality] = self._corrupt(modality, value, generator) if state[column] == 1 else value
        return sample

    def _clean(self, modality: str, index: int):
        if modality == "text":
            return str(self.table["texts"][index])
        if modality == "image":
            return self.images[int(self.table["images"][index])].clone()
        clip = int(self.table["clips"][index])
        return self.clips[self.offsets[clip]: self.offsets[clip + 1]].clone()

    @staticmethod
    def _corrupt(modality: str, value, generator: torch.Generator):
        """Make a modality unreadable: the sample's label can no longer be read from it."""
        if modality == "text":
            letters = "abcdefghijklmnopqrstuvwxyz"
            picks = torch.randint(len(letters), (max(3, len(value)),), generator=generator)
            return "".join(letters[i] for i in picks.tolist())
        if modality == "image":
            noise = torch.rand(value.shape, generator=generator)
            return (0.15 * value + 0.85 * noise).clamp(0, 1)
        exponent = float(torch.randint(3, (), generator=generator))
        return add_noise(value, snr_db=-15.0, exponent=exponent, generator=generator)


@hookimpl
def plait_config_schema():
    return SpokenDigitsOptions


@hookimpl
def plait_build_dataset(config, split):
    return SpokenDigits(config.options(SpokenDigitsOptions), split)
