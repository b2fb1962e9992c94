"""PSNR and SSIM: closed-form values, agreement with scikit-image on its sample images, batches."""

import math

import numpy as np
import pytest
import torch

from dit_video.eval import psnr, ssim

try:
    from skimage import data as skimage_data
    from skimage.metrics import structural_similarity
except ImportError:
    skimage_data = None
needs_skimage = pytest.mark.skipif(skimage_data is None, reason="scikit-image, the SSIM reference, is not installed")


def reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float, channel_axis=None) -> float:
    """scikit-image's SSIM with the settings of Wang et al. 2004."""
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=channel_axis)


def with_noise(image: np.ndarray, std: float, seed: int, low=-1.0, high=1.0) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, std, image.shape), low, high)


@pytest.fixture(scope="module")
def astronaut():
    """scikit-image's astronaut photo, 512 x 512 RGB, as [H, W, 3] float64 in [-1, 1]."""
    return skimage_data.astronaut().astype(np.float64) / 127.5 - 1


def to_torch(image: np.ndarray) -> torch.Tensor:
    """[H, W, C] numpy -> [1, C, H, W] float32."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def test_psnr_of_a_constant_offset_is_known():
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    assert torch.allclose(psnr(x, x + 0.02), torch.full((2,), 40.0), atol=1e-3)  # 10 log10(2^2 / 0.02^2)
    assert torch.allclose(psnr(x / 2 + 0.5, x / 2 + 0.51, data_range=1.0), torch.full((2,), 40.0), atol=1e-3)
    assert torch.allclose(psnr(x, x + 0.02, data_range=(-1, 3)), torch.full((2,), 46.0206), atol=1e-3)
    assert torch.allclose(psnr(x[:, :, 0], x[:, :, 0] - 0.2), torch.full((2,), 20.0), atol=1e-4)  # images
    assert psnr(x, x).tolist() == [math.inf, math.inf]


def test_psnr_of_a_video_is_the_mean_over_its_frames():
    x = torch.zeros(1, 3, 2, 8, 8)
    y = x.clone()
    y[:, :, 0] += 0.02  # 40 dB
    y[:, :, 1] += 0.2  # 20 dB
    assert psnr(x, y).item() == pytest.approx(30.0, abs=1e-4)  # not 23.0, the PSNR of the pooled MSE


@needs_skimage
def test_ssim_of_identical_inputs_is_one(astronaut):
    image = to_torch(astronaut)
    assert ssim(image, image).item() == pytest.approx(1.0, abs=1e-6)
    video = torch.rand(2, 3, 3, 24, 32) * 2 - 1
    assert torch.allclose(ssim(video, video), torch.ones(2), atol=1e-6)


@needs_skimage
@pytest.mark.parametrize("std", [0.05, 0.3])
def test_ssim_matches_scikit_image_on_a_color_photo(astronaut, std):
    noisy = with_noise(astronaut, std, seed=1)
    # the standard figure: the same pixels in [0, 1] (an 8-bit image scaled), L = 1
    expected = reference_ssim((astronaut + 1) / 2, (noisy + 1) / 2, data_range=1.0, channel_axis=-1)
    assert abs(ssim(to_torch(astronaut), to_torch(noisy)).item() - expected) < 1e-4
    assert 0.1 < expected < 0.95  # a test that can tell a wrong window or constant apart


@needs_skimage
def test_ssim_matches_scikit_image_on_gray_images_in_0_1_and_0_255():
    camera = skimage_data.camera().astype(np.float64) / 255  # 512 x 512
    for other in (with_noise(camera, 0.1, seed=2, low=0, high=1), np.roll(camera, 3, axis=1)):
        expected = reference_ssim(camera, other, data_range=1.0)
        a, b = (torch.from_numpy(image)[None, None].float() for image in (camera, other))
        assert abs(ssim(a, b, data_range=1.0).item() - expected) < 1e-4
        assert abs(ssim(255 * a, 255 * b, data_range=(0, 255)).item() - expected) < 1e-4


@needs_skimage
def test_ssim_of_a_video_is_the_mean_over_frames_of_scikit_images(astronaut):
    frames = [astronaut[:128, :160], astronaut[200:328, 300:460], astronaut[-128:, -160:]]  # three 128 x 160 views
    noisy = [with_noise(f, 0.02 + 0.1 * i, seed=i) for i, f in enumerate(frames)]
    expected = np.mean([reference_ssim((f + 1) / 2, (n + 1) / 2, data_range=1.0, channel_axis=-1)
                        for f, n in zip(frames, noisy)])
    video, noisy_video = (torch.stack([to_torch(f)[0] for f in fs], dim=1)[None] for fs in (frames, noisy))
    assert video.shape == (1, 3, 3, 128, 160)
    assert abs(ssim(video, noisy_video).item() - expected) < 1e-4


def test_each_sample_of_a_batch_is_scored_on_its_own():
    clean = torch.rand(3, 3, 2, 32, 32) * 2 - 1
    noisy = (clean + torch.randn_like(clean) * torch.tensor([0.05, 0.2, 0.5]).view(3, 1, 1, 1, 1)).clamp(-1, 1)
    for metric in (psnr, ssim):
        together = metric(clean, noisy)
        alone = torch.cat([metric(clean[i:i + 1], noisy[i:i + 1]) for i in range(3)])
        assert together.shape == (3,) and torch.allclose(together, alone, atol=1e-6)
        assert together[0] > together[1] > together[2]  # more noise, lower score
        changed = noisy.clone()
        changed[1] = clean[1]
        assert metric(clean, changed)[[0, 2]].tolist() == together[[0, 2]].tolist()


def test_scores_do_not_depend_on_the_pixel_scale_when_data_range_follows_it():
    a = torch.rand(2, 3, 2, 24, 24) * 2 - 1
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    for metric in (psnr, ssim):
        in_0_1 = metric((a + 1) / 2, (b + 1) / 2, data_range=1.0)
        in_0_255 = metric((a + 1) * 127.5, (b + 1) * 127.5, data_range=(0, 255))
        assert torch.allclose(metric(a, b), in_0_1, rtol=1e-4) and torch.allclose(in_0_1, in_0_255, rtol=1e-4)
    # SSIM is not shift-invariant: [-1, 1] pixels read as if they were [0, 2] give another number
    assert (ssim(a, b, data_range=2.0) - ssim(a, b)).abs().min() > 0.05


def test_bad_inputs_raise():
    x = torch.zeros(1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:, :, :1])
    with pytest.raises(ValueError, match="expected"):
        ssim(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10], x[..., :10])
    for data_range in (0.0, (1.0, -1.0)):
        with pytest.raises(ValueError, match="data_range"):
            psnr(x, x, data_range=data_range)
