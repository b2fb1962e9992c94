"""Position and noise-level embeddings, all computed from the input's own size (no fixed table),
so one model runs at any resolution, aspect ratio and length.

- `fourier_features(logsnr, dim)`: sin/cos of the log-SNR at geometric frequencies.
- `sincos_2d(height, width, dim, scale)`: absolute 2D positions for the spatial tokens.
- `rope_rotations` / `apply_rope`: rotary embeddings; q.k then depends on positions only
  through their difference.
- `RelativePositionBias`: the T5 bucketed relative position bias (the VDM choice for time).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fourier_features(logsnr: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] -> [B, dim]: cos and sin of logsnr * f for dim / 2 frequencies f from 1 down to
    1 / max_period (geometric), the usual timestep embedding applied to log-SNR."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=logsnr.device, dtype=torch.float32) / half)
    angles = logsnr.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sincos_2d(height: int, width: int, dim: int, scale: float = 1.0, device=None) -> torch.Tensor:
    """[height * width, dim] fixed 2D sin-cos embedding, rows first. Half the channels encode
    the row, half the column. `scale` multiplies the positions: with scale = base / size, a
    model trained at one size sees the same range of positions at another."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    ys = torch.arange(height, device=device, dtype=torch.float32) * scale
    xs = torch.arange(width, device=device, dtype=torch.float32) * scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.cat([sincos_1d(grid_y.flatten(), dim // 2), sincos_1d(grid_x.flatten(), dim // 2)], dim=1)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] positions -> [N, dim] fixed sin-cos embedding (sines, then cosines)."""
    freqs = 1.0 / 10_000 ** (torch.arange(dim // 2, device=positions.device, dtype=torch.float32) / (dim // 2))
    angles = positions[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def rope_rotations(positions: torch.Tensor, dim: int, base: float = 10_000.0) -> torch.Tensor:
    """The rotations of rotary embeddings at (float) `positions` [L]: [L, dim / 2, 2], the cosine
    and sine of each channel pair's angle, position * base^(-2i / dim). Kept real rather than
    complex so that a compiled block takes them as an ordinary input (see apply_rope)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [..., L, dim] by `rotations` [L, dim / 2, 2] (from
    rope_rotations), in float32. Eagerly, as one complex product, forward and backward, this is
    several times faster than the same rotation written with real cos / sin products (which need a
    copy of x with its pairs swapped). Under torch.compile it is the other way round: inductor
    generates no code for complex ops (they stay separate kernels, each a pass over q and k, and
    it warns), while the real form fuses into one kernel with the casts around it."""
    if torch.compiler.is_compiling():
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotations.unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rotations)).flatten(-2).to(x.dtype)


def t5_bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bidirectional bucket of each relative position (key - query): half the buckets per
    sign; within a half, exact buckets for small distances and logarithmically wider ones up to
    `max_distance`, beyond which everything shares the last bucket."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    is_small = distance < exact
    # log-spaced buckets exact .. half - 1 for distances exact .. max_distance
    log_bucket = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned bias per head and T5 bucket of (key - query) position: [1, heads, Lq, Lk].
    Only differences of positions enter, so it is the same for any offset of all frames."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Embedding(num_buckets, heads)
        nn.init.zeros_(self.bias.weight)

    def forward(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        relative = k_positions[None, :].long() - q_positions[:, None].long()
        buckets = t5_bucket(relative, self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)[None]
