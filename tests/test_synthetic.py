"""The synthetic captioned videos: every attribute in the caption is visible in the pixels."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_video.data.synthetic import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption, generate, render_clip,
                                      shape_mask)
from dit_video.data.video import read_video

ROOT = Path(__file__).resolve().parents[1]


def _foreground(video: torch.Tensor, background: str) -> torch.Tensor:
    """[T, H, W] mask of pixels that differ from the background colour."""
    bg = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1, 1) * 2 - 1
    return (video - bg).abs().amax(0) > 0.2


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_the_shape_moves_in_the_named_direction(direction):
    video = render_clip("circle", "red", direction, "gray", frames=9, size=48, rng=random.Random(1))
    fg = _foreground(video, "gray").float()
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    cx = (fg * xs).sum((1, 2)) / fg.sum((1, 2))
    cy = (fg * ys).sum((1, 2)) / fg.sum((1, 2))
    dx, dy = DIRECTIONS[direction]
    step_x, step_y = (cx[1:] - cx[:-1]), (cy[1:] - cy[:-1])
    along, across = (step_x, step_y) if dx else (step_y, step_x)
    sign = dx or dy
    assert (sign * along > 0.3).all() and (across.abs() < 0.3).all()
    # the shape stays whole inside the frame: the same area in every frame, touching no border
    area = fg.sum((1, 2))
    assert (area.max() - area.min()) / area.mean() < 0.1
    assert not fg[:, 0].any() and not fg[:, -1].any() and not fg[:, :, 0].any() and not fg[:, :, -1].any()


@pytest.mark.parametrize("color", sorted(COLORS))
def test_colours_and_background_are_the_named_ones(color):
    video = render_clip("square", color, "right", "dark blue", frames=3, size=48, rng=random.Random(2))
    fg = _foreground(video, "dark blue")
    inside = video[:, fg].median(dim=1).values  # the median skips the antialiased edge
    outside = video[:, ~fg].mean(dim=1)
    torch.testing.assert_close(inside, torch.tensor(COLORS[color]) * 2 - 1, rtol=0, atol=1e-5)
    torch.testing.assert_close(outside, torch.tensor(BACKGROUNDS["dark blue"]) * 2 - 1, rtol=0, atol=0.01)


def test_shapes_are_told_apart_by_how_much_of_their_box_they_fill():
    fills = {}
    for shape in SHAPES:
        mask = shape_mask(shape, (32.0, 32.0), 12.0, 64) > 0.5
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills[shape] = mask.sum().item() / box.item()
    assert fills["square"] > 0.95 and 0.72 < fills["circle"] < 0.85 and 0.4 < fills["triangle"] < 0.6


def test_a_split_is_the_same_every_time_and_its_files_are_real_videos(tmp_path):
    a = generate(tmp_path / "a", "train", count=4, frames=5, size=32, progress=False)
    b = generate(tmp_path / "b", "train", count=4, frames=5, size=32, progress=False)
    c = generate(tmp_path / "c", "val", count=4, frames=5, size=32, progress=False)
    assert a.read_text() == b.read_text() != c.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["caption"] == caption(row["shape"], row["color"], row["direction"], row["background"])
        video = read_video(a.parent / row["path"])
        assert video.shape == (3, 5, 32, 32)


def test_cli_bad_input_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dit_video.data.synthetic", "--out", str(tmp_path), "--count", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
