"""The loader: full batches despite bad files, however many in a row, bad files named, exact
resume with workers, joint image and video batches."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_video.data import BucketConfig, BucketSampler, Loader, MediaDataset, Shape, read_manifest
from dit_video.data.loader import NoUsableData
from dit_video.data.synthetic import generate

BAD = {"truncated.mp4": "cannot read as a video", "empty.mp4": "cannot read as a video",
       "text.mp4": "cannot read as a video", "missing.mp4": "no such file", "short.mp4": "too few"}
VIDEO_BUCKETS = [BucketConfig(5, 16, 16, 3), BucketConfig(9, 32, 24, 2)]
IMAGE_BUCKETS = [BucketConfig(1, 24, 24, 4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 good clips of 9 frames and 5 bad files in one manifest, and 4 good images and a bad one in another."""
    root = tmp_path_factory.mktemp("data")
    manifest = generate(root, "train", count=8, frames=9, size=32, progress=False)
    folder = manifest.parent
    good = (folder / "00000.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[:len(good) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 10)
    short = generate(root / "short", "val", count=1, frames=3, size=32, progress=False)
    (short.parent / "00000.mp4").rename(folder / "short.mp4")
    lines = manifest.read_text().splitlines()
    for i, name in enumerate(BAD):  # spread among the good ones
        lines.insert(2 * i + 1, json.dumps({"path": name, "caption": f"bad {name}"}))
    manifest.write_text("\n".join(lines) + "\n")

    images = root / "images"
    images.mkdir()
    for i in range(4):
        pixels = np.full((20 + 4 * i, 28, 3), 60 * i, np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "bad.png").write_bytes((images / "0.png").read_bytes()[:50])
    image_lines = [json.dumps({"path": name, "caption": f"image {name}"}) for name in ["0.png", "bad.png", "1.png",
                                                                                      "2.png", "3.png"]]
    (images / "manifest.jsonl").write_text("\n".join(image_lines) + "\n")
    return read_manifest(manifest), read_manifest(images / "manifest.jsonl")


def make(data, num_workers=0, images=False, video_buckets=VIDEO_BUCKETS, **kwargs):
    videos, stills = data
    sampler = BucketSampler(len(videos), len(stills) if images else 0, video_buckets,
                            IMAGE_BUCKETS if images else [], image_ratio=0.4 if images else 0, seed=3, **kwargs)
    return Loader(MediaDataset(videos, "video"), MediaDataset(stills, "image") if images else None, sampler,
                  num_workers=num_workers)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_replaced_and_named(data, num_workers):
    loader = make(data, num_workers)
    batches = take(loader, 14)  # 13 files, 2 or 3 a batch: more than two epochs
    for batch in batches:
        shape, size = batch["shape"], 3 if batch["shape"].frames == 5 else 2
        assert batch["video"].shape == (size, 3, shape.frames, shape.height, shape.width)
        assert len(batch["captions"]) == size and not any(c.startswith("bad") for c in batch["captions"])
        assert batch["is_image"].dtype == torch.bool and not batch["is_image"].any()
    folder = data[0][0].path.parent
    assert loader.skipped.keys() == {str(folder / name) for name in BAD}
    for name, reason in BAD.items():
        assert loader.skipped[str(folder / name)].startswith(f"{folder / name}: ")
        assert reason in loader.skipped[str(folder / name)]


def test_workers_give_the_same_stream(data):
    for a, b in zip(take(make(data, 0, images=True), 10), take(make(data, 2, images=True), 10)):
        assert torch.equal(a["video"], b["video"]) and a["captions"] == b["captions"] and a["shape"] == b["shape"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_identical_batches(data, num_workers):
    reference = take(make(data, num_workers, images=True), 10)
    first = make(data, num_workers, images=True)
    take(first, 4)  # the workers have prefetched beyond these
    state = first.state_dict()
    assert state["sampler"]["batches"] == 4
    resumed = make(data, num_workers, images=True)
    resumed.load_state_dict(state)
    for a, b in zip(reference[4:], take(resumed, 6), strict=True):
        assert torch.equal(a["video"], b["video"]) and a["captions"] == b["captions"]
    assert torch.equal(take(first, 1)[0]["video"], reference[4]["video"])  # iterating again picks up where it left


def test_resume_on_two_ranks_covers_the_global_batch(data):
    rank0, rank1 = (make(data, 0, rank=rank, world=2) for rank in (0, 1))
    whole = make(data, 0, video_buckets=[BucketConfig(b.frames, b.height, b.width, 2 * b.batch_size)
                                         for b in VIDEO_BUCKETS])
    for a, b, both in zip(take(rank0, 3), take(rank1, 3), take(whole, 3)):
        assert torch.equal(torch.cat([a["video"], b["video"]]), both["video"])


def test_joint_batches_mark_images(data):
    loader = make(data, 2, images=True)
    batches = take(loader, 20)
    assert str(data[1][1].path) in loader.skipped
    kinds = {bool(batch["is_image"][0]) for batch in batches}
    assert kinds == {True, False}
    for batch in batches:
        if batch["is_image"].all():
            assert batch["shape"] == Shape(1, 24, 24) and batch["video"].shape == (4, 3, 1, 24, 24)
            assert all(caption.startswith("image") for caption in batch["captions"])
        else:
            assert not batch["is_image"].any() and batch["video"].shape[2] in (5, 9)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_long_run_of_bad_files_is_passed_over(data, num_workers):
    """Every bad file, several times over, then one good clip: every batch is that clip."""
    bad = [entry for entry in data[0] if entry.path.name in BAD]
    good = next(entry for entry in data[0] if entry.path.name not in BAD)
    videos = bad * 3 + [good]
    loader = Loader(MediaDataset(videos, "video"), None, BucketSampler(len(videos), 0, VIDEO_BUCKETS[:1], [], 0, seed=0),
                    num_workers=num_workers)
    for batch in take(loader, 4):
        assert batch["captions"] == [good.caption] * 3
    assert loader.skipped.keys() == {str(entry.path) for entry in bad}


def test_no_usable_file_is_a_clear_error(data):
    videos = [entry for entry in data[0] if entry.path.name in BAD]
    loader = Loader(MediaDataset(videos, "video"), None, BucketSampler(len(videos), 0, VIDEO_BUCKETS, [], 0, seed=0))
    with pytest.raises(NoUsableData, match="^none of the 5 video files can be read at \\d+x\\d+x\\d+, e.g. .*mp4: "):
        take(loader, 1)
    assert len(loader.skipped) == 5


def test_loader_checks_its_datasets_against_the_sampler(data):
    sampler = BucketSampler(len(data[0]) - 1, 0, VIDEO_BUCKETS, [], 0, seed=0)
    with pytest.raises(ValueError, match="the sampler expects 12 videos, the dataset has 13"):
        Loader(MediaDataset(data[0], "video"), None, sampler)
