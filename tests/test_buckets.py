"""The bucket sampler: exact resume, ranks splitting the global batch, epochs, shares, validation."""

import itertools

import pytest

from dit_video.config import ConfigError, from_dict
from dit_video.data import BucketConfig, BucketSampler, Shape

VIDEO_BUCKETS = [BucketConfig(9, 32, 32, 3), BucketConfig(17, 16, 24, 2, weight=3.0)]
IMAGE_BUCKETS = [BucketConfig(1, 64, 64, 5)]


def sampler(world=1, rank=0, seed=0, scale=1, **kwargs):
    """Videos and images; `scale` multiplies every batch size."""
    args = dict(video_count=23, image_count=11, image_ratio=0.3,
                video_buckets=[BucketConfig(b.frames, b.height, b.width, b.batch_size * scale, b.weight)
                               for b in VIDEO_BUCKETS],
                image_buckets=[BucketConfig(b.frames, b.height, b.width, b.batch_size * scale) for b in IMAGE_BUCKETS])
    return BucketSampler(**{**args, **kwargs}, seed=seed, rank=rank, world=world)


def draw(s, n):
    return list(itertools.islice(iter(s), n))


def test_resume_continues_the_same_stream():
    reference = draw(sampler(world=2, rank=1), 60)
    first = sampler(world=2, rank=1)
    head = draw(first, 25)
    state = first.state_dict()
    resumed = sampler(world=2, rank=1)
    resumed.load_state_dict(state)
    assert head + draw(resumed, 35) == reference
    other_rank = sampler(world=2, rank=0)
    draw(other_rank, 25)
    assert other_rank.state_dict() == state  # one state for all ranks: any rank's checkpoint will do


def test_ranks_split_the_global_batch():
    """Ranks 0 and 1 of world 2 take the two halves of what world 1 draws with twice the batch size."""
    whole = draw(sampler(world=1, scale=2), 40)
    halves = zip(draw(sampler(world=2, rank=0), 40), draw(sampler(world=2, rank=1), 40))
    for batch, (a, b) in zip(whole, halves):
        assert a.shape == b.shape == batch.shape and a.kind == b.kind == batch.kind
        assert a.keys + b.keys == batch.keys
    assert {batch.kind for batch in whole} == {"video", "image"} and len({batch.shape for batch in whole}) == 3


def test_a_state_carries_over_to_another_world_size():
    """Positions count items over all ranks, so two ranks continue what one rank with their
    combined batch drew, in the same epoch order."""
    one = sampler(world=1, scale=2)
    draw(one, 10)
    state = one.state_dict()
    ranks = [sampler(world=2, rank=rank) for rank in (0, 1)]
    for rank in ranks:
        rank.load_state_dict(state)
    for batch, a, b in zip(draw(one, 20), draw(ranks[0], 20), draw(ranks[1], 20)):
        assert a.keys + b.keys == batch.keys


def test_each_epoch_visits_every_index_once_per_kind():
    keys = {"video": [], "image": []}
    for batch in draw(sampler(), 300):
        assert all(shape == batch.shape for _, shape, _ in batch.keys)
        keys[batch.kind] += [index for index, _, _ in batch.keys]
    for kind, count in (("video", 23), ("image", 11)):
        epochs = [keys[kind][i:i + count] for i in range(0, len(keys[kind]) - count + 1, count)]
        assert len(epochs) >= 5
        assert all(sorted(epoch) == list(range(count)) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) == len(epochs)  # a fresh order each epoch


def test_item_seeds_follow_the_position_not_the_index():
    seeds = [seed for batch in draw(sampler(), 200) if batch.kind == "video" for _, _, seed in batch.keys]
    assert len(set(seeds)) == len(seeds)
    assert draw(sampler(seed=1), 20) != draw(sampler(), 20)


def test_shares_follow_the_ratio_and_the_weights():
    batches = draw(sampler(), 6000)
    images = sum(batch.kind == "image" for batch in batches) / len(batches)
    long_clips = sum(batch.shape.frames == 17 for batch in batches) / sum(batch.kind == "video" for batch in batches)
    assert images == pytest.approx(0.3, abs=0.02) and long_clips == pytest.approx(0.75, abs=0.02)
    assert all(batch.shape == Shape(1, 64, 64) and len(batch.keys) == 5 for batch in batches if batch.kind == "image")


def test_one_kind_alone():
    only_images = BucketSampler(0, 7, [], IMAGE_BUCKETS, image_ratio=1, seed=0)
    assert {batch.kind for batch in draw(only_images, 20)} == {"image"}
    only_videos = BucketSampler(7, 0, VIDEO_BUCKETS, [], image_ratio=0, seed=0)
    assert {batch.kind for batch in draw(only_videos, 20)} == {"video"}


def test_a_state_from_other_data_is_refused():
    state = sampler().state_dict()
    with pytest.raises(ValueError, match="sampler state is for seed 0 .* this sampler has seed 1"):
        sampler(seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="counts"):
        sampler(video_count=24).load_state_dict(state)


@pytest.mark.parametrize("kwargs, error", [
    (dict(image_ratio=1.5), "image_ratio must be in \\[0, 1\\]"),
    (dict(image_buckets=[BucketConfig(5, 64, 64, 2)]), "image bucket 0: an image has 1 frame, got frames=5"),
    (dict(video_buckets=[BucketConfig(9, 32, 32, 2, weight=0)]), "video bucket 0: .* weight > 0"),
    (dict(video_buckets=[BucketConfig(9, 32, 32, 0)]), "video bucket 0: need frames, height, width, batch_size >= 1"),
    (dict(image_count=0), "0 images and 1 image buckets"),
    (dict(video_buckets=[]), "23 videos and 0 video buckets"),
    (dict(image_count=0, image_buckets=[]), "image_ratio=0.3 but there are no images"),
    (dict(video_count=0, video_buckets=[]), "image_ratio=0.3 but there are only images: set it to 1"),
    (dict(video_count=0, video_buckets=[], image_count=0, image_buckets=[], image_ratio=0), "no data"),
    (dict(image_ratio=0), "11 images but image_ratio=0: they would never be drawn"),
    (dict(image_ratio=1), "23 videos but image_ratio=1: they would never be drawn"),
    (dict(rank=2, world=2), "need 0 <= rank < world"),
])
def test_bad_settings_are_one_line_errors(kwargs, error):
    with pytest.raises(ValueError, match=error) as e:
        sampler(**kwargs)
    assert "\n" not in str(e.value)


def test_bucket_config_from_a_config_file():
    bucket = from_dict(BucketConfig, dict(frames=17, height=32, width=48, batch_size=4))
    assert bucket == BucketConfig(17, 32, 48, 4, 1.0)
    with pytest.raises(ConfigError, match="weight: expected a number > 0, got -1"):
        from_dict(BucketConfig, dict(frames=17, height=32, width=48, batch_size=4, weight=-1))
    with pytest.raises(ConfigError, match="batch_size: missing required key"):
        from_dict(BucketConfig, dict(frames=17, height=32, width=48))


def test_describe_shows_global_batches_and_shares():
    table = sampler(world=4).describe()
    assert "23 videos, 11 images" in table and "world 4" in table
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows == [["video", "9", "32", "32", "3", "12", "1", "17.5%"],
                    ["video", "17", "16", "24", "2", "8", "3", "52.5%"],
                    ["image", "1", "64", "64", "5", "20", "1", "30.0%"]]
    table = sampler(world=4).describe(accumulate=2)  # an optimizer step takes two batches
    assert "global: batch x world x accumulate 2" in table
    assert [line.split()[5] for line in table.splitlines()[2:]] == ["24", "16", "40"]
