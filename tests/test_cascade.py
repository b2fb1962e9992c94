import pytest
import torch

from dit_video.diffusion import (alpha_sigma, augment_condition, downsample_video, sample_augmentation_logsnr,
                                 upsample_latent)


def test_downsample_constant_and_ramps_exactly():
    video = torch.full((2, 3, 5, 8, 12), 0.25, dtype=torch.float64)
    assert torch.equal(downsample_video(video, spatial=4), torch.full((2, 3, 5, 2, 3), 0.25, dtype=torch.float64))
    # the mean of a linear ramp over a block of s pixels is its value at the block's center
    h = torch.arange(8, dtype=torch.float64)
    w = torch.arange(12, dtype=torch.float64)
    ramp = (h[:, None] + 10 * w[None, :]).expand(1, 1, 1, 8, 12)
    hc = 2 * torch.arange(4, dtype=torch.float64) + 0.5  # centers of blocks of 2
    wc = 2 * torch.arange(6, dtype=torch.float64) + 0.5
    torch.testing.assert_close(downsample_video(ramp, spatial=2)[0, 0, 0], hc[:, None] + 10 * wc[None, :],
                               rtol=0, atol=1e-12)


def test_downsample_temporal_keeps_first_and_last_frames():
    video = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 3, 9, 4, 4)
    for factor, kept in [(1, list(range(9))), (2, [0, 2, 4, 6, 8]), (4, [0, 4, 8]), (8, [0, 8])]:
        low = downsample_video(video, temporal=factor)
        assert low.shape == (2, 3, len(kept), 4, 4)
        assert low[0, 0, :, 0, 0].tolist() == kept
    both = downsample_video(video, spatial=2, temporal=4)
    assert both.shape == (2, 3, 3, 2, 2) and both[1, 2, :, 1, 1].tolist() == [0, 4, 8]
    image = torch.randn(1, 3, 1, 4, 4)
    assert torch.equal(downsample_video(image, temporal=4), image)  # T = 1: nothing to drop


def test_downsample_errors():
    video = torch.zeros(1, 3, 9, 12, 12)
    with pytest.raises(ValueError, match="temporal downsampling by 3 needs 1 \\+ 3 k frames, got 9"):
        downsample_video(video, temporal=3)
    with pytest.raises(ValueError, match="needs H and W divisible by it, got 12x12"):
        downsample_video(video, spatial=5)
    with pytest.raises(ValueError, match="factors must be >= 1"):
        downsample_video(video, spatial=0)
    with pytest.raises(ValueError, match="expected a video"):
        downsample_video(video[0])


def test_upsample_identity_constant_and_bilinear_ramp():
    latent = torch.randn(2, 4, 3, 5, 6)
    assert torch.equal(upsample_latent(latent, 3, 5, 6), latent)
    const = torch.full((1, 4, 2, 3, 5), -1.5)
    assert torch.equal(upsample_latent(const, 3, 12, 10), torch.full((1, 4, 3, 12, 10), -1.5))
    # align_corners=False: target pixel x samples the source at (x + 0.5) / 2 - 0.5, clamped at the edges
    ramp = torch.arange(4, dtype=torch.float64).expand(1, 1, 1, 2, 4)
    up = upsample_latent(ramp, 1, 4, 8)
    assert up[0, 0, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]
    assert torch.equal(up[0, 0, 0, 0], up[0, 0, 0, 3])


@pytest.mark.parametrize("t, frames, sources", [
    (3, 5, [0, 1, 1, 2, 2]),  # j / 2, ties to the later frame: ceil(j / 2), the factor-2 TSR
    (2, 5, [0, 0, 1, 1, 1]),  # j / 4
    (3, 4, [0, 1, 1, 2]),  # 2 j / 3
    (5, 17, [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]),  # j / 4: factor 4
    (1, 4, [0, 0, 0, 0]),  # an image broadcast over time
])
def test_upsample_frame_mapping(t, frames, sources):
    latent = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(2, 3, t, 2, 2)
    up = upsample_latent(latent, frames, 2, 2)
    assert up.shape == (2, 3, frames, 2, 2)
    assert up[1, 2, :, 1, 0].tolist() == sources
    assert sources[0] == 0 and sources[-1] == t - 1


def test_upsample_refuses_to_downsample():
    latent = torch.zeros(1, 4, 3, 8, 8)
    for size in [(2, 8, 8), (3, 4, 8), (3, 8, 4)]:
        with pytest.raises(ValueError, match="only upsamples"):
            upsample_latent(latent, *size)


def test_augment_condition_keeps_unit_variance_and_correlation_alpha():
    logsnr = torch.tensor([-3.0, 0.0, 2.0, 6.0])
    cond = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(1))
    out = augment_condition(cond, logsnr, generator=torch.Generator().manual_seed(2))
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    # standard errors at n = 2e5: variance 0.0032, correlation < 0.0023
    torch.testing.assert_close(out.var(1), torch.ones(4), rtol=0, atol=0.015)
    corr = torch.stack([torch.corrcoef(torch.stack([o, c]))[0, 1] for o, c in zip(out, cond)])
    torch.testing.assert_close(corr, alpha, rtol=0, atol=0.01)


def test_augment_condition_given_noise_and_seeded():
    cond = torch.randn(2, 3, 2, 4, 4, dtype=torch.bfloat16)
    noise = torch.randn(2, 3, 2, 4, 4)
    logsnr = torch.tensor([1.0, -2.0])
    alpha, sigma = alpha_sigma(logsnr)
    expected = alpha.view(2, 1, 1, 1, 1) * cond.float() + sigma.view(2, 1, 1, 1, 1) * noise
    torch.testing.assert_close(augment_condition(cond, logsnr, noise=noise), expected)
    first = augment_condition(cond, logsnr, generator=torch.Generator().manual_seed(0))
    again = augment_condition(cond.float(), logsnr, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # float32 noise: the same in every precision


def test_sample_augmentation_logsnr():
    levels = sample_augmentation_logsnr(10_000, -2.0, 6.0, torch.Generator().manual_seed(0))
    assert levels.shape == (10_000,) and levels.dtype == torch.float32
    assert levels.min() >= -2.0 and levels.max() <= 6.0
    assert abs(levels.mean().item() - 2.0) < 0.1 and abs(levels.var().item() - 64 / 12) < 0.3
    again = sample_augmentation_logsnr(10_000, -2.0, 6.0, torch.Generator().manual_seed(0))
    assert torch.equal(levels, again)
    assert torch.equal(sample_augmentation_logsnr(3, 4.0, 4.0), torch.full((3,), 4.0))
    for low, high in [(3.0, 1.0), (0.0, float("inf")), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="finite augmentation log-SNR bounds"):
            sample_augmentation_logsnr(3, low, high)
