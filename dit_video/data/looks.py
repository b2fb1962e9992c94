"""A video for a quick look: an animated GIF (plays inline in a browser, a README or an issue)
and a PNG contact sheet of its frames (the whole clip at a glance). Both from [3, T, H, W] in
[-1, 1], written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_path


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (clamped, rounded)."""
    if video.ndim != 4 or video.shape[0] != 3 or 0 in video.shape:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).numpy()


def write_gif(path: str | os.PathLike, video: torch.Tensor, fps: float = 8) -> Path:
    """An animated GIF that loops. GIF stores frame times in hundredths of a second, so the
    rate is rounded to that (8 fps: 12 or 13 hundredths, 0.12 s here)."""
    frames = [Image.fromarray(f) for f in to_uint8(video)]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                       duration=round(1000 / fps / 10) * 10, optimize=False)
    return Path(path)


def write_contact_sheet(path: str | os.PathLike, video: torch.Tensor, columns: int = 9, max_frames: int = 18,
                        gap: int = 2) -> Path:
    """A PNG grid of up to `max_frames` frames evenly spaced over the clip (first and last
    included), `columns` to a row, in reading order, on a white background."""
    pixels = to_uint8(video)
    count = min(len(pixels), max_frames)
    picked = pixels[np.linspace(0, len(pixels) - 1, count).round().astype(int)]
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    _, h, w, _ = pixels.shape
    sheet = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(picked):
        r, c = divmod(i, columns)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frame
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return Path(path)
