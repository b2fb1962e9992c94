"""A video for a quick look: an animated GIF (plays inline in a browser, a README or an issue)
and a PNG contact sheet of its frames (the whole clip at a glance). Both from [3, T, H, W] in
[-1, 1], written atomically. `tile` lays pictures or whole videos out in a grid: the one layout
the sheets, the evaluation's samples and the A/B's sample videos share."""

from __future__ import annotations

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


def tile(cells: torch.Tensor, columns: int, gap: int = 2, fill: float = 255) -> torch.Tensor:
    """Cells [N, ..., H, W] laid out `columns` to a row (fewer for fewer cells) in reading order,
    `gap` pixels of `fill` between them: [..., rows * (H + gap) - gap, columns * (W + gap) - gap].
    The leading dimensions ride along, so frames [N, 3, H, W] make a picture and videos
    [N, 3, T, H, W] a video of the grid."""
    n, *lead, h, w = cells.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = cells.new_full((*lead, rows * (h + gap) - gap, columns * (w + gap) - gap), fill)
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        canvas[..., r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = cell
    return canvas


def save_png(path: str | os.PathLike, picture: torch.Tensor) -> Path:
    """A uint8 picture [3, H, W] as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return Path(path)


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
    pixels = torch.from_numpy(to_uint8(video)).permute(0, 3, 1, 2)  # [T, 3, H, W]
    count = min(len(pixels), max_frames)
    picked = pixels[np.linspace(0, len(pixels) - 1, count).round().astype(int)]
    return save_png(path, tile(picked, columns, gap))
