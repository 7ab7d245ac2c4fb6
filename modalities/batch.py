"""Batching samples that may each lack any modality.

A batch is a dict: ``label`` [B], ``ids`` (list), ``present`` {modality: bool [B]} and
``inputs`` {modality: {...}} where every value has B rows (zeros or "" where absent):
text -> ``text`` (list of str) and, when samples carry ``text_numbers``, ``numbers`` (list of float
lists); image -> ``image`` [B, C, H, W];
audio -> ``audio`` [B, T_max] zero-padded and ``lengths`` [B].
"""
from __future__ import annotations

from typing import Any

import torch

from plait.core.errors import DataError

from . import MODALITIES


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    size = len(samples)
    present = {m: torch.tensor([s.get(m) is not None for s in samples], dtype=torch.bool) for m in MODALITIES}
    inputs: dict[str, dict[str, Any]] = {"text": {"text": [s.get("text") or "" for s in samples]}}
    if any("text_numbers" in s for s in samples):  # the values of a text's [NUM] tokens (finance's xVal mode)
        inputs["text"]["numbers"] = [list(s.get("text_numbers") or []) for s in samples]

    images = [s.get("image") for s in samples]
    shapes = {tuple(i.shape) for i in images if i is not None}
    if len(shapes) > 1:
        ids = [s.get("id") for s in samples if s.get("image") is not None]
        raise DataError(f"images of different shapes {sorted(shapes)} in one batch (samples {ids[:5]}...)")
    shape = shapes.pop() if shapes else (1, 1, 1)
    image = torch.zeros(size, *shape)
    for row, img in enumerate(images):
        if img is not None:
            image[row] = img
    inputs["image"] = {"image": image}

    waves = [s.get("audio") for s in samples]
    lengths = torch.tensor([w.shape[-1] if w is not None else 0 for w in waves], dtype=torch.long)
    audio = torch.zeros(size, max(int(lengths.max()), 1))
    for row, wave in enumerate(waves):
        if wave is not None:
            audio[row, : wave.shape[-1]] = wave
    inputs["audio"] = {"audio": audio, "lengths": lengths}

    return {
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "ids": [str(s.get("id", "")) for s in samples],
        "present": present,
        "inputs": inputs,
    }
