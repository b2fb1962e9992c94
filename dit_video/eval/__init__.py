"""Metrics of video quality on [B, C, T, H, W] (or [B, C, H, W]) pixels in [-1, 1], one value per sample."""

from .metrics import SSIM_WINDOW, psnr, ssim

__all__ = ["psnr", "ssim", "SSIM_WINDOW"]
