"""Manifests of captioned media and the dataset that decodes one item of them.

A manifest is a JSONL file, one item a line: `{"path": ..., "caption": ..., "fps": ...}` with
`fps` optional and other keys (the synthetic generator's attributes) ignored; paths are
relative to the manifest's folder. `MediaDataset` is indexed by `(index, shape, item_seed)`:
the bucket sampler decides the shape of the whole batch and the seed of each item, so that the
same key gives the same pixels in any worker, on any rank, after any resume.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from .image import read_image
from .video import VideoError, read_video, video_info

__all__ = ["ManifestError", "Entry", "read_manifest", "Shape", "MediaDataset"]


class ManifestError(ValueError):
    """A bad manifest: one line, `<manifest>:<line>: <reason>`."""


@dataclass(frozen=True)
class Entry:
    path: Path
    caption: str
    fps: float | None = None  # the file's frame rate, when the manifest knows it (saves opening the file)


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """The entries of a JSONL manifest, with paths resolved against the manifest's folder.
    Blank lines are allowed; anything else that is not an entry raises ManifestError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from None
    entries = [_entry(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    if not entries:
        raise ManifestError(f"{path}: no entries")
    return entries


def _entry(line: str, manifest: Path, number: int) -> Entry:
    where = f"{manifest}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key in ("path", "caption"):
        if not isinstance(item.get(key), str):
            raise ManifestError(f"{where}: '{key}' must be a string, got {item.get(key)!r}")
    if not item["path"]:
        raise ManifestError(f"{where}: 'path' is empty")
    fps = item.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise ManifestError(f"{where}: 'fps' must be a number > 0 or null, got {fps!r}")
    return Entry(manifest.parent / item["path"], item["caption"], None if fps is None else float(fps))


@dataclass(frozen=True)
class Shape:
    """The pixel shape of every item in a batch; `frames == 1` for images."""

    frames: int
    height: int
    width: int


class MediaDataset(torch.utils.data.Dataset):
    """Videos or images of a manifest, decoded on demand at a shape chosen by the caller.

    Videos: `shape.frames` frames, `stride` apart, from a start frame drawn uniformly from the
    valid ones with `item_seed`. With a target `fps`, the stride is instead
    `max(1, round(source_fps / fps))`, the source rate coming from the manifest or the file;
    `stride` then only serves files whose rate is unknown. Frames are resized to cover
    (height, width) and center-cropped. Images are one-frame videos.

    A file that cannot be used (unreadable, damaged, too short) raises VideoError.
    """

    def __init__(self, entries: list[Entry], kind: Literal["video", "image"], fps: float | None = None,
                 stride: int = 1):
        if kind not in ("video", "image"):
            raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
        if not entries:
            raise ValueError(f"no {kind} entries")
        if kind == "image" and (fps is not None or stride != 1):
            raise ValueError("fps and stride apply to videos, not images")
        if (fps is not None and not fps > 0) or stride < 1:
            raise ValueError(f"need fps > 0 and stride >= 1, got fps={fps}, stride={stride}")
        self.entries, self.kind, self.fps, self.stride = entries, kind, fps, stride

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, Shape, int]) -> dict:
        index, shape, item_seed = key
        entry = self.entries[index]
        if self.kind == "image":
            if shape.frames != 1:
                raise ValueError(f"an image has 1 frame, asked for {shape.frames}")
            try:
                video = read_image(entry.path, (shape.height, shape.width))
            except VideoError:
                raise
            except (ValueError, Image.DecompressionBombError) as e:  # what read_image lets through from PIL
                raise VideoError(f"{entry.path}: not a readable image ({e})") from None
        else:
            video = self._read_clip(entry, shape, item_seed)
        return {"video": video, "caption": entry.caption, "index": index}

    def _read_clip(self, entry: Entry, shape: Shape, item_seed: int) -> torch.Tensor:
        available, file_fps, _, _ = video_info(entry.path)
        source_fps = entry.fps or file_fps
        stride = self.stride
        if self.fps is not None and math.isfinite(source_fps) and source_fps > 0:
            stride = max(1, round(source_fps / self.fps))
        needed = (shape.frames - 1) * stride + 1
        if needed > available:
            raise VideoError(f"{entry.path}: has {available} frames, too few for {shape.frames} "
                             f"at stride {stride} ({needed} needed)")
        start = random.Random(item_seed).randrange(available - needed + 1)
        return read_video(entry.path, shape.frames, (shape.height, shape.width), stride, start)
