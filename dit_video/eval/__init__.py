"""Metrics of video quality on [B, C, T, H, W] (or [B, C, H, W]) pixels in [-1, 1], one value per sample."""

from .adherence import (Consistency, Detection, adherence, adherence_table, detect, detect_batch, parse_caption,
                        temporal_consistency, write_adherence_table)
from .metrics import SSIM_WINDOW, psnr, ssim

__all__ = ["psnr", "ssim", "SSIM_WINDOW"]
__all__ += ["detect", "detect_batch", "Detection", "temporal_consistency", "Consistency", "adherence",
            "adherence_table", "write_adherence_table", "parse_caption"]  # prompt adherence on the synthetic domain
