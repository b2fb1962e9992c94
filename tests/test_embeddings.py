import math

import pytest
import torch

from dit_video.models.embeddings import (RelativePositionBias, apply_rope, fourier_features, rope_rotations,
                                         sincos_2d, t5_bucket)


def test_fourier_features_of_log_snr():
    e = fourier_features(torch.tensor([0.0, 2.0]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # the first frequency is 1: cos(2), sin(2)
    assert e[1, 0].item() == pytest.approx(math.cos(2.0)) and e[1, 4].item() == pytest.approx(math.sin(2.0))


def test_sincos_2d_is_computed_for_any_size_and_scales_positions():
    e = sincos_2d(3, 5, 16)
    assert e.shape == (15, 16)
    # rows first: tokens of one row share the row half, tokens of one column the column half
    grid = e.view(3, 5, 16)
    assert torch.equal(grid[1, 0, :8], grid[1, 4, :8]) and torch.equal(grid[0, 2, 8:], grid[2, 2, 8:])
    # scale 0.5 at 4x6 gives the positions 0, 0.5, 1, ...: every other one is the 2x3 grid's
    fine, coarse = sincos_2d(4, 6, 16, scale=0.5).view(4, 6, 16), sincos_2d(2, 3, 16).view(2, 3, 16)
    torch.testing.assert_close(fine[::2, ::2], coarse)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_rope_scores_depend_only_on_position_differences():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    positions = torch.arange(6.0)

    def scores(offset: float) -> torch.Tensor:
        rotations = rope_rotations(positions + offset, 32)
        return apply_rope(q, rotations) @ apply_rope(k, rotations).transpose(-1, -2)

    torch.testing.assert_close(scores(0.0), scores(37.0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0.0), q @ k.transpose(-1, -2), atol=1e-2)  # it does rotate
    rotations = rope_rotations(positions, 32)
    torch.testing.assert_close(apply_rope(q, rotations).norm(dim=-1), q.norm(dim=-1))  # a rotation


def test_rope_rotates_each_channel_pair_by_position_times_its_frequency():
    """Against the textbook form: pair i of position p turns by p * 10000^(-2i / dim)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    positions = torch.tensor([0.0, 1.0, 2.5, 7.0, 100.0])
    angles = positions[:, None].double() * 10_000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    a, b = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rope_rotations(positions, 8)).double(), expected, rtol=1e-5, atol=1e-5)
    half = apply_rope(x.to(torch.bfloat16), rope_rotations(positions, 8))  # computed in float32, returned as given
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=2e-2)


def test_compiled_rope_is_the_real_rotation_and_fuses():
    """Under torch.compile apply_rope takes its real cos / sin form: the same rotation, forward and
    backward, in float32 and bfloat16, and no complex op left for inductor to warn about."""
    import warnings

    compiled = torch.compile(apply_rope, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    rotations = rope_rotations(torch.tensor([0.0, 1.0, 2.5, 7.0, 100.0]), 8)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
        weights = torch.randn(x.shape, generator=g)
        results = []
        for rope in (apply_rope, compiled):
            leaf = x.clone().requires_grad_()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = rope(leaf, rotations)
                (out.float() * weights).sum().backward()
            assert not [w for w in caught if "complex" in str(w.message)], [str(w.message) for w in caught]
            results.append((out.detach(), leaf.grad))
        assert results[1][0].dtype == dtype
        for ours, eager in zip(results[1], results[0]):
            torch.testing.assert_close(ours.float(), eager.float(), rtol=tolerance, atol=tolerance)


def test_t5_buckets_match_hand_computed_values():
    # 32 buckets, max distance 128: 16 per sign, exact below 8, then 8 + floor(8 log(d / 8) / log 16)
    relative = torch.tensor([0, -1, 1, -7, 7, -8, -16, -32, -127, -128, -1000, 128, 1000])
    expected = torch.tensor([0, 1, 17, 7, 23, 8, 10, 12, 15, 15, 15, 31, 31])
    assert torch.equal(t5_bucket(relative), expected)


def test_relative_position_bias_is_the_same_for_any_offset():
    bias = RelativePositionBias(heads=4)
    assert torch.equal(bias(torch.arange(5), torch.arange(5)), torch.zeros(1, 4, 5, 5))  # zero at init
    torch.nn.init.normal_(bias.bias.weight)
    frames = torch.arange(9)
    a, b = bias(frames, frames), bias(frames + 100, frames + 100)
    assert a.shape == (1, 4, 9, 9) and torch.equal(a, b)
    assert not torch.equal(a[0, 0, 0, 1], a[0, 0, 1, 0])  # forward and backward in time differ
