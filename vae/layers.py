"""Causal building blocks of the video VAE.

Time is causal everywhere: convolutions pad on the past side only, normalization and attention
work frame by frame, and temporal resampling keeps frame 0 alone. So an image is a 1-frame
video through the same code, and a long video can be processed chunk by chunk with a `Stream`
that carries each layer's last input frames over to the next chunk, giving the one-pass result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dit_video.frames import FrameNorm, per_frame


class Stream:
    """State of a chunked pass: whether this chunk starts the video, and each causal layer's
    tail of input frames from the previous chunk."""

    def __init__(self):
        self.first = True
        self.tails: dict[int, torch.Tensor] = {}


def starts_video(stream: Stream | None) -> bool:
    return stream is None or stream.first


class CausalConv3d(nn.Module):
    """3D convolution, 'same' in space, causal in time: frame i sees frames i-k+1 .. i. The video
    start is padded with copies of frame 0; inside a stream, with the previous chunk's frames."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (3, 3, 3)):
        super().__init__()
        self.time_pad = kernel[0] - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.time_pad:
            if starts_video(stream):
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            else:
                past = stream.tails[id(self)]
            x = torch.cat([past, x], dim=2)
            if stream is not None:
                stream.tails[id(self)] = x[:, :, -self.time_pad:].detach().clone()  # not a view: free the chunk
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups_of):
        super().__init__()
        self.norm1 = FrameNorm(groups_of(in_channels), in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameNorm(groups_of(out_channels), out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the positions of each frame (the mid-block attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = FrameNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, 3, c).unbind(2)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3))


class Downsample(nn.Module):
    """Halve height and width (strided conv per frame) and/or time (frame 0 kept, then the mean
    of each following pair of frames)."""

    def __init__(self, channels: int, spatial: bool, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if spatial else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.conv is not None:
            x = per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)
        if self.temporal:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if starts_video(stream) else (x[:, :, :0], x)
            b, c, t, h, w = rest.shape
            rest = rest.reshape(b, c, t // 2, 2, h, w).mean(dim=3)
            x = torch.cat([head, rest], dim=2)
        return x


class Upsample(nn.Module):
    """Double height and width (nearest, then a conv per frame) and/or time (frame 0 kept, each
    later frame repeated twice): the exact frame-count inverse of `Downsample`."""

    def __init__(self, channels: int, spatial: bool, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if spatial else None

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        if self.temporal:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if starts_video(stream) else (x[:, :, :0], x)
            x = torch.cat([head, rest.repeat_interleave(2, dim=2)], dim=2)
        if self.conv is not None:
            x = per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)
        return x
