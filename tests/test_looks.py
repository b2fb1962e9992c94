"""The quick looks: a grid layout shared by every picture and grid video, and the contact sheet."""

import numpy as np
import torch
from PIL import Image

from dit_video.data.looks import tile, write_contact_sheet


def test_tile_puts_each_cell_in_reading_order_with_gaps_of_fill():
    cells = torch.arange(5, dtype=torch.uint8)[:, None, None, None].expand(5, 3, 4, 6)  # [N, 3, H, W]
    grid = tile(cells, columns=2, gap=1, fill=255)
    assert grid.shape == (3, 3 * 5 - 1, 2 * 7 - 1)
    for i in range(5):
        r, c = divmod(i, 2)
        assert (grid[:, r * 5:r * 5 + 4, c * 7:c * 7 + 6] == i).all()
    assert (grid[:, 4, :] == 255).all() and (grid[:, :, 6] == 255).all()  # the gaps
    assert (grid[:, 10:, 7:] == 255).all()  # the sixth cell is empty


def test_tile_carries_leading_dimensions_so_videos_make_a_grid_video():
    videos = torch.randn(3, 3, 4, 2, 2)  # [N, 3, T, H, W]
    grid = tile(videos, columns=3, gap=0)
    assert grid.shape == (3, 4, 2, 6)
    assert torch.equal(grid[..., 2:4], videos[1])
    assert tile(videos, columns=8, gap=0).shape == grid.shape  # no wider than the cells


def test_the_contact_sheet_picks_frames_evenly_first_and_last_included(tmp_path):
    levels = torch.linspace(-1, 1, 13)
    video = levels[None, :, None, None].expand(3, 13, 4, 4)
    write_contact_sheet(tmp_path / "sheet.png", video, columns=3, max_frames=5, gap=2)
    with Image.open(tmp_path / "sheet.png") as image:
        sheet = np.asarray(image)
    assert sheet.shape == (2 * 6 - 2, 3 * 6 - 2, 3)
    picked = [round(float((levels[i] + 1) * 127.5)) for i in (0, 3, 6, 9, 12)]
    cells = [sheet[r * 6:r * 6 + 4, c * 6:c * 6 + 4] for r in range(2) for c in range(3)][:5]
    assert [int(cell[0, 0, 0]) for cell in cells] == picked
