"""Synthetic captioned videos: a colored shape moving in a named direction over a background.

    python -m dit_video.data.synthetic --out data/synthetic --split train --count 64 --frames 17 --size 64

writes `<out>/<split>/NNNNN.mp4` and `<out>/<split>/manifest.jsonl` (one line a clip: path
relative to the manifest, caption, fps, and the attributes). Each split has its own fixed seed,
so a split is the same on every machine. Captions read like "a red circle moving right on a
gray background"; every attribute is visible and checkable in the pixels.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli import UsageError, exits_cleanly
from ..files import write_text_atomic
from .video import write_video

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
          "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.45, 0.45, 0.45), "dark blue": (0.05, 0.07, 0.3)}
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def caption(shape: str, color: str, direction: str, background: str) -> str:
    return f"a {color} {shape} moving {direction} on a {background} background"


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int, supersample: int = 4) -> torch.Tensor:
    """Coverage in [0, 1] of a shape on a size x size grid ([H, W]), antialiased by supersampling.
    Coordinates are in pixels, x to the right and y down."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        inside = dx.square() + dy.square() <= radius**2
    elif shape == "square":
        inside = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    elif shape == "triangle":  # pointing up: inside the three half-planes of its edges
        top, base = -radius, radius * 0.8
        half_width = radius * 1.05
        inside = (dy <= base) & (dy >= top + (dx.abs() / half_width) * (base - top))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return inside.float().reshape(size, supersample, size, supersample).mean(dim=(1, 3))


def render_clip(shape: str, color: str, direction: str, background: str, frames: int, size: int,
                rng: random.Random) -> torch.Tensor:
    """[3, frames, size, size] in [-1, 1]: the shape crossing the frame in `direction` at a
    constant speed, from a random start that keeps it inside the frame throughout."""
    radius = size * rng.uniform(0.12, 0.18)
    travel = size - 2 * radius - 2  # the full path fits inside the frame
    distance = travel * rng.uniform(0.5, 1.0)
    ux, uy = DIRECTIONS[direction]
    lo, hi = radius + 1, size - radius - 1  # where the centre may be

    def start(u: float) -> float:  # a start from which start + distance * u stays in [lo, hi]
        if u > 0:
            return rng.uniform(lo, hi - distance)
        if u < 0:
            return rng.uniform(lo + distance, hi)
        return rng.uniform(lo, hi)

    sx, sy = start(ux), start(uy)
    fg = torch.tensor(COLORS[color]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1)
    video = torch.empty(3, frames, size, size)
    for i in range(frames):
        progress = i / max(frames - 1, 1)
        mask = shape_mask(shape, (sx + ux * distance * progress, sy + uy * distance * progress), radius, size)
        video[:, i] = bg + (fg - bg) * mask
    return video * 2 - 1


def generate(out: Path, split: str, count: int, frames: int, size: int, fps: int = 8,
             progress: bool = True) -> Path:
    """Write `count` clips of one split and their manifest; returns the manifest path."""
    rng = random.Random(SPLIT_SEEDS[split])
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(count), desc=f"synthetic {split}", disable=not progress):
        attrs = {"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)),
                 "direction": rng.choice(sorted(DIRECTIONS)), "background": rng.choice(sorted(BACKGROUNDS))}
        name = f"{i:05d}.mp4"
        write_video(folder / name, render_clip(frames=frames, size=size, rng=rng, **attrs), fps=fps)
        lines.append(json.dumps({"path": name, "caption": caption(**attrs), "fps": fps, **attrs}))
    manifest = folder / "manifest.jsonl"
    write_text_atomic(manifest, "\n".join(lines) + "\n")
    return manifest


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit_video.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="train")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.count < 1 or args.frames < 1 or args.size < 16 or args.fps < 1:
        raise UsageError("need --count >= 1, --frames >= 1, --size >= 16 and --fps >= 1")
    try:
        manifest = generate(Path(args.out), args.split, args.count, args.frames, args.size, args.fps)
    except OSError as e:
        raise UsageError(f"{args.out}: cannot write ({e.strerror})") from None
    print(f"wrote {args.count} clips and {manifest}")


if __name__ == "__main__":
    main()
