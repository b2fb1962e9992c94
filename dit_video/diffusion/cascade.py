"""The inputs of the cascade's super-resolution stages (Imagen Video, VDM).

A spatial (SSR) or temporal (TSR) stage is a diffusion model of the high-resolution latent that
sees the low-resolution video as `cond`. In training, that video is the clip itself made small
(`downsample_video`), encoded, brought to the target latent's shape (`upsample_latent`) and noised
(`augment_condition`) at a random level (`sample_augmentation_logsnr`) that the backbone is told as
`cond_logsnr`. Conditioning augmentation makes the stage robust to the artifacts of the stage
before it; at sampling one fixed level is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .parameterization import diffuse


def downsample_video(video: torch.Tensor, spatial: int = 1, temporal: int = 1) -> torch.Tensor:
    """The low-resolution input of an SSR / TSR stage, from pixels `[B, C, T, H, W]`.

    Space: the mean over each `spatial x spatial` block (area filtering, which antialiases);
    H and W must divide by the factor. Time: frames 0, temporal, 2 temporal, ..., T - 1, so the
    first and last frames are kept and T - 1 must divide by the factor. From T = 1 + f k frames
    this gives 1 + f k / temporal, which a causal VAE with temporal factor f encodes when
    `temporal` divides k.
    """
    if video.ndim != 5:
        raise ValueError(f"expected a video [B, C, T, H, W], got shape {tuple(video.shape)}")
    if spatial < 1 or temporal < 1:
        raise ValueError(f"downsampling factors must be >= 1, got spatial={spatial}, temporal={temporal}")
    _, _, frames, height, width = video.shape
    if (frames - 1) % temporal:
        raise ValueError(f"temporal downsampling by {temporal} needs 1 + {temporal} k frames, got {frames}")
    if height % spatial or width % spatial:
        raise ValueError(f"spatial downsampling by {spatial} needs H and W divisible by it, got {height}x{width}")
    video = video[:, :, ::temporal]
    return F.avg_pool3d(video, (1, spatial, spatial)) if spatial > 1 else video


def upsample_latent(latent: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """A low-resolution latent `[B, C, t, h, w]` brought to the target's `[B, C, frames, height, width]`.

    Space: bilinear (align_corners=False, pixel centers aligned). Time: target frame j repeats
    source frame round(j (t - 1) / (frames - 1)), nearest in normalized time with ties to the
    later frame, so first and last frames align; t = 1 repeats the one frame. For a factor-2 TSR
    between causal-VAE latents (t = 1 + k, frames = 1 + 2k) this is source frame ceil(j / 2), the
    one that encodes the kept pixel frames of target frame j.
    """
    if latent.ndim != 5:
        raise ValueError(f"expected a latent [B, C, T, H, W], got shape {tuple(latent.shape)}")
    _, _, t, h, w = latent.shape
    if frames < t or height < h or width < w:
        raise ValueError(f"upsample_latent only upsamples: {t}x{h}x{w} -> {frames}x{height}x{width}")
    if (height, width) != (h, w):
        latent = rearrange(latent, "b c t h w -> (b t) c h w")
        latent = F.interpolate(latent, size=(height, width), mode="bilinear", align_corners=False)
        latent = rearrange(latent, "(b t) c h w -> b c t h w", t=t)
    if frames == t:
        return latent
    # round half up of j (t - 1) / (frames - 1), in exact integer arithmetic
    j = torch.arange(frames, device=latent.device)
    return latent[:, :, (2 * j * (t - 1) + frames - 1) // (2 * (frames - 1))]


def augment_condition(cond: torch.Tensor, logsnr: torch.Tensor, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Conditioning augmentation: alpha cond + sigma noise at log-SNR `logsnr` `[B]` (the forward
    process applied to the condition). Noise is drawn in float32 with `generator` when not given,
    so one seed gives the same augmentation in every precision."""
    if noise is None:
        device = generator.device if generator is not None else cond.device
        noise = torch.randn(cond.shape, generator=generator, dtype=torch.float32, device=device).to(cond.device)
    return diffuse(cond, logsnr, noise)


def sample_augmentation_logsnr(batch: int, low: float, high: float, generator: torch.Generator | None = None,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """Training augmentation levels: log-SNR uniform in [low, high], float32 `[batch]`.

    Higher is less noise: at log-SNR 10 the condition keeps alpha = 0.99998 of itself and gets
    sigma = 0.0067 of noise, so a large `high` includes (almost) unaugmented conditions; low = high
    is one fixed level. Both must be finite: log-SNR = +inf would be no augmentation at all.
    """
    if not (abs(low) < float("inf") and abs(high) < float("inf")) or low > high:
        raise ValueError(f"need finite augmentation log-SNR bounds low <= high, got [{low}, {high}]")
    u = torch.rand(batch, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else device)
    return (low + (high - low) * u).float().to(device)
