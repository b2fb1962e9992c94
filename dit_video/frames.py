"""Layers that treat every frame of a [B, C, T, H, W] video on its own, so that nothing mixes
frames except the layers meant to (causal convolutions, temporal attention)."""

from __future__ import annotations

import torch
from torch import nn


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own: no statistics cross frames (that would break
    causality, chunking and the frame-by-frame equivalence of images in a video batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(super().forward, x)
