"""The shape of a VideoVAE: channels per level, compression, blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dit_video.config import param


@dataclass
class VAEConfig:
    in_channels: int = param(3, ge=1)
    latent_channels: int = param(4, ge=1)
    channels: list[int] = param(default_factory=lambda: [64, 128, 256, 256], ge=1)  # one entry per level
    spatial_factor: int = param(8, ge=1)  # a power of two: height and width are divided by it
    temporal_factor: int = param(4, ge=1)  # a power of two: 1 + f*k frames become 1 + k latent frames
    blocks_per_level: int = param(2, ge=1)
    attention: bool = True  # self-attention over each frame's positions in the middle block
    norm_groups: int = param(32, ge=1)  # GroupNorm groups (per frame), capped at the channel count

    def __post_init__(self):
        for key in ("spatial_factor", "temporal_factor"):
            value = getattr(self, key)
            if value & (value - 1):
                raise ValueError(f"{key} must be a power of two, got {value}")
        need = max(self.spatial_downsamples, self.temporal_downsamples)
        if len(self.channels) - 1 < need:
            raise ValueError(f"channels needs at least {need + 1} levels for a {self.temporal_factor}x"
                             f"{self.spatial_factor}x{self.spatial_factor} compression, got {len(self.channels)}")
        for c in self.channels:
            if c % self.groups(c):
                raise ValueError(f"channel count {c} is not divisible by its {self.groups(c)} norm groups")

    @property
    def spatial_downsamples(self) -> int:
        return int(math.log2(self.spatial_factor))

    @property
    def temporal_downsamples(self) -> int:
        return int(math.log2(self.temporal_factor))

    def groups(self, channels: int) -> int:
        return min(self.norm_groups, channels)

    def stage_downsamples(self, stage: int) -> tuple[bool, bool]:
        """(spatial, temporal) halving done by encoder stage `stage` (between levels stage and
        stage + 1): space in the first stages, time in the last ones, as in MAGVIT-v2."""
        stages = len(self.channels) - 1
        return stage < self.spatial_downsamples, stage >= stages - self.temporal_downsamples
