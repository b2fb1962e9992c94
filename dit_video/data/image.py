"""Image files to pixels: [3, 1, H, W] float32 in [-1, 1], a one-frame video."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .video import VideoError


def read_image(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """An image resized (antialiased) to cover `size` = (height, width), then center-cropped to
    it, as a one-frame video [3, 1, H, W] in [-1, 1]. Unreadable files raise VideoError."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise VideoError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
    h, w = x.shape[1:]
    scale = max(size[0] / h, size[1] / w)
    new_h, new_w = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return x[:, None, top:top + size[0], left:left + size[1]].clamp(-1, 1)
