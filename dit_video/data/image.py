"""Image files to pixels: [3, 1, H, W] float32 in [-1, 1], a one-frame video."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .video import VideoError, cover_and_center_crop


def read_image(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """An image resized (antialiased) to cover `size` = (height, width), then center-cropped to
    it, as a one-frame video [3, 1, H, W] in [-1, 1]. Unreadable files raise VideoError."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise VideoError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
    return cover_and_center_crop(x[None], size).permute(1, 0, 2, 3).contiguous()
