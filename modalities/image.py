"""Images: loading files into float tensors [C, H, W] in [0, 1], and augmentation.

A file is decoded the way a viewer shows it: the EXIF orientation applied, the first frame of
an animation, transparency (an alpha channel, or a palette or colour key marked transparent)
composited over a background, 16-bit samples scaled from their own range, CMYK converted to
RGB. Then it becomes grayscale (luma) or RGB, as many channels as the encoder takes.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from plait.core.errors import DataError

WHITE = (255, 255, 255)
# Modes whose samples are wider than 8 bits: scaled by their full range, not clipped at 255.
WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def parse_colour(value: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name or ``#rrggbb`` (for config validation)."""
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ValueError(f"not a colour: '{value}' (a name such as 'white', or '#rrggbb')") from None


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit single-channel image as 8-bit "L", scaled from its range.
    (Pillow's own ``convert("L")`` clips every value above 255 to white.)"""
    scale = WIDE_MODES[image.mode]
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.size and np.nanmax(values) > 1.0:
        scale = 255.0  # float images in 0..255
    if not np.isfinite(values).all():
        raise ValueError("the image holds NaN or infinite values")
    return Image.fromarray(np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def flatten(image: Image.Image, channels: int, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``image`` (any mode) as "L" (channels 1) or "RGB" (channels 3), transparency composited
    over ``background``."""
    if image.mode in WIDE_MODES:
        image = _wide_to_8bit(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")  # palette and colour-key transparency become alpha here
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("L" if channels == 1 else "RGB")


def load_image(path: str | Path | BinaryIO, size: tuple[int, int], channels: int,
               background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """Read an image file as ``channels`` (1 or 3) channels resized to ``size`` (H, W), values in [0, 1].
    ``path`` may be an open binary file (a tar shard's member), named in errors by its ``name``."""
    where = getattr(path, "name", path)
    if channels not in (1, 3):
        raise DataError(f"{where}: images load as 1 (grayscale) or 3 (RGB) channels, not {channels}")
    try:
        with Image.open(path) as file:
            file.seek(0)  # an animation's first frame
            upright = ImageOps.exif_transpose(file)  # as the camera held it
            image = flatten(upright, channels, background).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            tensor: torch.Tensor = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
            return tensor
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{where}: unreadable image: not a format Pillow knows") from None
    except Exception as exc:  # noqa: BLE001 - decoders of damaged files raise many kinds (struct.error, ...)
        raise DataError(f"{where}: unreadable image: {type(exc).__name__}: {exc}") from None


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """A batch [B, C, H, W] of 1- or 3-channel images with ``channels`` channels: grayscale
    repeated into RGB, or RGB reduced to luma (ITU-R 601, as Pillow's "L")."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    raise DataError(f"images with {have} channels cannot feed an encoder that takes {channels}")


class ImageAugment:
    """Small affine jitter and noise: digits stay digits. Picklable."""

    def __init__(self, degrees: float = 12.0, translate: float = 0.1, noise: float = 0.05) -> None:
        self.transform = v2.Compose([
            v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=(0.85, 1.1)),
            v2.GaussianNoise(sigma=noise, clip=True),
        ])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        augmented: torch.Tensor = self.transform(image)
        return augmented
