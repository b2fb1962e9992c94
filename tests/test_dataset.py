"""Manifests and MediaDataset: paths, errors, frame selection (start, stride, fps), images."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dit_video.data import Entry, ManifestError, MediaDataset, Shape, VideoError, read_manifest, write_video
from dit_video.data.synthetic import generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), "train", count=8, frames=9, size=32, progress=False)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A 16-frame clip at 8 fps whose frame i is flat gray at -0.9 + 0.1 i."""
    video = (-0.9 + 0.1 * torch.arange(16.0)).view(1, 16, 1, 1).expand(3, 16, 32, 32)
    return write_video(tmp_path_factory.mktemp("numbered") / "numbered.mp4", video, fps=8)


def frame_numbers(video):
    return ((video.mean(dim=(0, 2, 3)) + 0.9) / 0.1).round().long().tolist()


def test_manifest_paths_are_relative_to_its_folder_and_extra_keys_are_allowed(synthetic):
    entries = read_manifest(synthetic)
    assert len(entries) == 8
    assert entries[0].path == synthetic.parent / "00000.mp4" and entries[0].path.is_file()
    assert entries[0].fps == 8.0 and entries[0].caption.startswith("a ")


def test_manifest_fields(tmp_path):
    manifest = tmp_path / "sub" / "m.jsonl"
    manifest.parent.mkdir()
    lines = [{"path": "a.mp4", "caption": "x"}, {"path": str(tmp_path / "b.png"), "caption": "", "fps": None}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_manifest(manifest) == [Entry(manifest.parent / "a.mp4", "x"), Entry(tmp_path / "b.png", "")]


@pytest.mark.parametrize("text, error", [
    ('{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4"', ":2: not valid JSON"),
    ('["a.mp4", "x"]', ":1: expected a JSON object, got list"),
    ('{"path": "a.mp4"}', ":1: 'caption' must be a string, got None"),
    ('{"path": "", "caption": "x"}', ":1: 'path' is empty"),
    ('{"path": "a.mp4", "caption": "x", "fps": 0}', ":1: 'fps' must be a number > 0 or null, got 0"),
    ('{"path": "a.mp4", "caption": "x", "fps": "8"}', ":1: 'fps' must be a number > 0 or null"),
    ("\n \n", ": no entries"),
])
def test_manifest_errors_name_the_line(tmp_path, text, error):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match="^" + re.escape(str(manifest) + error)) as e:
        read_manifest(manifest)
    assert "\n" not in str(e.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")


def test_a_video_item(synthetic):
    dataset = MediaDataset(read_manifest(synthetic), "video")
    item = dataset[3, Shape(5, 16, 24), 7]
    assert item["video"].shape == (3, 5, 16, 24) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["caption"] == dataset.entries[3].caption and item["index"] == 3
    assert torch.equal(dataset[3, Shape(5, 16, 24), 7]["video"], item["video"])


def test_the_seed_picks_the_start_uniformly_among_valid_ones(numbered):
    dataset = MediaDataset([Entry(numbered, "n")], "video", stride=3)
    clips = [frame_numbers(dataset[0, Shape(4, 8, 8), seed]["video"]) for seed in range(200)]
    starts = [clip[0] for clip in clips]
    assert all(clip == list(range(clip[0], clip[0] + 10, 3)) for clip in clips)
    assert set(starts) == set(range(7))  # 16 frames, 4 at stride 3 span 10: starts 0..6
    assert max(np.bincount(starts)) < 2 * 200 / 7


@pytest.mark.parametrize("entry_fps, target, stride", [(8.0, 4.0, 2), (None, 4.0, 2), (8.0, 3.0, 3), (8.0, 30.0, 1),
                                                       (24.0, 8.0, 3)])
def test_a_target_fps_sets_the_stride_from_the_source_rate(numbered, entry_fps, target, stride):
    """The rate in the manifest wins over the file's (8 fps), which is read when the manifest has none."""
    dataset = MediaDataset([Entry(numbered, "n", entry_fps)], "video", fps=target)
    clip = frame_numbers(dataset[0, Shape(3, 8, 8), 1]["video"])
    assert clip == list(range(clip[0], clip[0] + 3 * stride, stride))


def test_a_clip_too_short_for_the_shape_is_a_video_error(numbered):
    dataset = MediaDataset([Entry(numbered, "n")], "video", stride=2)
    assert dataset[0, Shape(8, 8, 8), 0]["video"].shape[1] == 8  # 15 frames spanned, 16 there
    with pytest.raises(VideoError, match="has 16 frames, too few for 9 at stride 2 \\(17 needed\\)"):
        dataset[0, Shape(9, 8, 8), 0]


def test_images_are_one_frame_videos(tmp_path):
    good, truncated, text = tmp_path / "good.png", tmp_path / "truncated.png", tmp_path / "text.png"
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255
    Image.fromarray(pixels).save(good)
    truncated.write_bytes(good.read_bytes()[:60])
    text.write_text("not an image")
    dataset = MediaDataset([Entry(good, "half white"), Entry(truncated, ""), Entry(text, "")], "image")
    video = dataset[0, Shape(1, 20, 20), 0]["video"]
    assert video.shape == (3, 1, 20, 20)
    assert video[:, 0, :, 0].eq(1).all() and video[:, 0, :, -1].eq(-1).all()
    for index in (1, 2):
        with pytest.raises(VideoError, match="not a readable image"):
            dataset[index, Shape(1, 20, 20), 0]
    with pytest.raises(ValueError, match="an image has 1 frame, asked for 5"):
        dataset[0, Shape(5, 20, 20), 0]


def test_dataset_arguments(numbered):
    entries = [Entry(numbered, "n")]
    with pytest.raises(ValueError, match="kind must be"):
        MediaDataset(entries, "audio")
    with pytest.raises(ValueError, match="apply to videos"):
        MediaDataset(entries, "image", fps=8)
    with pytest.raises(ValueError, match="stride >= 1"):
        MediaDataset(entries, "video", stride=0)
