"""Images: loading files into float tensors [C, H, W] in [0, 1], and augmentation."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from plait.core.errors import DataError


def load_image(path: str | Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Read an image file, convert to ``channels`` (1 or 3) and resize to ``size`` (H, W)."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            return v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image: {exc}") from None


class ImageAugment:
    """Small affine jitter and noise: digits stay digits. Picklable."""

    def __init__(self, degrees: float = 12.0, translate: float = 0.1, noise: float = 0.05) -> None:
        self.transform = v2.Compose([
            v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=(0.85, 1.1)),
            v2.GaussianNoise(sigma=noise, clip=True),
        ])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)
