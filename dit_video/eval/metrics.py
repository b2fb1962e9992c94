"""PSNR and SSIM between two batches of videos [B, C, T, H, W] (or images [B, C, H, W]).

Both give one value per sample, [B]: the metric of each frame, averaged over the frames, as
video autoencoder and generation papers report them.

`data_range` is the pixels' range: a pair (low, high), by default (-1, 1), or a number L for
pixels in [0, L] (1 or 255, say). PSNR needs only its width; SSIM needs the low end too, since
its luminance term compares the local means as they are: the standard figure is defined on
8-bit pixels [0, 255], so pixels are shifted to start at 0 first. (Taken as they are, [-1, 1]
pixels give another number: 0.87 instead of 0.84 for scikit-image's astronaut with noise.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "SSIM_WINDOW"]

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004: an 11x11 Gaussian window, sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DataRange = float | tuple[float, float]  # (low, high), or L for [0, L]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: DataRange = (-1.0, 1.0)) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(L^2 / MSE) with L the width of `data_range`,
    of each frame (MSE over channels and pixels), averaged over frames: [B]. Identical frames
    give inf."""
    a, b = _as_videos(a, b)
    _, span = _low_and_span(data_range)
    mse = (a - b).square().mean(dim=(1, 3, 4))  # [B, T]
    return (10 * torch.log10(span**2 / mse)).mean(dim=1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: DataRange = (-1.0, 1.0)) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each channel of each frame, averaged: [B].

    The pixels are shifted so that `data_range` starts at 0, as for 8-bit images. The local
    statistics are Gaussian-weighted (11x11 window, sigma 1.5) population moments, kept only
    where the window fits inside the frame (no padding), with C1 = (0.01 L)^2 and
    C2 = (0.03 L)^2, L the width of `data_range`: the numbers of scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` on
    the shifted pixels.
    """
    a, b = _as_videos(a, b)
    low, span = _low_and_span(data_range)
    batch, _, _, height, width = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    x, y = (v.reshape(-1, height, width) - low for v in (a, b))  # one plane per channel and frame
    moments = _gaussian_blur(torch.stack([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, xx, yy, xy = moments.unbind(dim=1)
    var_x, var_y, cov = xx - mu_x.square(), yy - mu_y.square(), xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * span) ** 2, (SSIM_K2 * span) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(-2, -1)).view(batch, -1).mean(dim=1)


def _low_and_span(data_range: DataRange) -> tuple[float, float]:
    low, high = data_range if isinstance(data_range, (tuple, list)) else (0.0, data_range)
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with high > low, or a positive number, got {data_range!r}")
    return float(low), float(high - low)


def _as_videos(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as [B, C, T, H, W] in at least float32, after checking that they match."""
    if a.shape != b.shape:
        raise ValueError(f"the two inputs differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim not in (4, 5):
        raise ValueError(f"expected videos [B, C, T, H, W] or images [B, C, H, W], got shape {tuple(a.shape)}")
    if a.ndim == 4:
        a, b = a[:, :, None], b[:, :, None]
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def _gaussian_blur(planes: torch.Tensor) -> torch.Tensor:
    """[N, K, H, W] filtered with the normalized SSIM Gaussian, separably, over the valid region only."""
    offsets = torch.arange(SSIM_WINDOW, device=planes.device, dtype=planes.dtype) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    window = window / window.sum()
    k = planes.shape[1]
    planes = F.conv2d(planes, window.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    return F.conv2d(planes, window.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
