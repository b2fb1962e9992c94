"""VideoVAE: a causal 3D convolutional autoencoder, pixels [B, 3, 1 + f*k, H, W] in [-1, 1] to
latents [B, c, 1 + k, H / s, W / s] (f, s: the temporal and spatial factors; 4 and 8 by default).

The latent is a diagonal Gaussian; `encode` returns its mean (or a sample), normalized with a
per-channel shift and scale fitted on data by `fit_latent_stats` and stored with the weights.
Long videos go through `encode`/`decode` in temporal chunks with a causal cache (the same
result as one pass, at memory bounded by the chunk), large frames in overlapping spatial tiles
(approximate: tiles are blended, not exact).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dit_video.config import ConfigError, from_dict, read_yaml, save_config
from dit_video.files import atomic_path
from dit_video.frames import FrameNorm

from .config import VAEConfig
from .layers import CausalConv3d, Downsample, FrameAttention, ResBlock, Stream, Upsample


class _Middle(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block1 = ResBlock(channels, channels, cfg.groups)
        self.attn = FrameAttention(channels, cfg.groups(channels)) if cfg.attention else None
        self.block2 = ResBlock(channels, channels, cfg.groups)

    def forward(self, x, stream=None):
        x = self.block1(x, stream)
        if self.attn is not None:
            x = self.attn(x, stream)
        return self.block2(x, stream)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = nn.ModuleList(ResBlock(ch[max(i - 1, 0)] if j == 0 else c, c, cfg.groups)
                                   for j in range(cfg.blocks_per_level))
            down = Downsample(c, *cfg.stage_downsamples(i)) if i < len(ch) - 1 else None
            self.levels.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down else {})}))
        self.mid = _Middle(ch[-1], cfg)
        self.norm_out = FrameNorm(cfg.groups(ch[-1]), ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)
        # The posterior starts nearly deterministic (std e^-3, not 1): with unit noise on a small
        # mean the decoder first sees mostly noise, and on synthetic frames is 6 dB worse after
        # 300 steps (24 against 30 dB PSNR). The KL term still sets the final variance.
        with torch.no_grad():
            self.conv_out.conv.bias[cfg.latent_channels:] = -6.0

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        x = self.conv_in(x, stream)
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x, stream)
            if "down" in level:
                x = level["down"](x, stream)
        x = self.mid(x, stream)
        return self.conv_out(nn.functional.silu(self.norm_out(x)), stream)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = list(reversed(cfg.channels))
        stages = len(ch) - 1
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid = _Middle(ch[0], cfg)
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = nn.ModuleList(ResBlock(ch[max(i - 1, 0)] if j == 0 else c, c, cfg.groups)
                                   for j in range(cfg.blocks_per_level + 1))
            # level i undoes encoder stage (stages - 1 - i)
            up = Upsample(c, *cfg.stage_downsamples(stages - 1 - i)) if i < stages else None
            self.levels.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up else {})}))
        self.norm_out = FrameNorm(cfg.groups(ch[-1]), ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.in_channels)

    def forward(self, z: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        x = self.mid(self.conv_in(z, stream), stream)
        for level in self.levels:
            for block in level["blocks"]:
                x = block(x, stream)
            if "up" in level:
                x = level["up"](x, stream)
        return self.conv_out(nn.functional.silu(self.norm_out(x)), stream)


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Latent normalization, fitted on data (fit_latent_stats) and saved with the weights.
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(cfg.latent_channels))

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_shape(self, video_shape) -> tuple[int, ...]:
        b, _, t, h, w = video_shape
        f, s = self.temporal_factor, self.spatial_factor
        return b, self.latent_channels, 1 + (t - 1) // f, h // s, w // s

    def check_video(self, video: torch.Tensor) -> None:
        """ValueError, in one line, for anything encode cannot take."""
        f, s = self.temporal_factor, self.spatial_factor
        if video.ndim != 5:
            raise ValueError(f"expected a video [B, C, T, H, W], got shape {tuple(video.shape)}")
        _, c, t, h, w = video.shape
        if c != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} channels, got {c} (shape {tuple(video.shape)})")
        if (t - 1) % f:
            valid = ", ".join(str(1 + f * k) for k in range(4))
            raise ValueError(f"{t} frames: with temporal factor {f} a video needs 1 + {f}*k frames "
                             f"({valid}, ...)")
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not divisible by the spatial factor {s}")
        if not torch.isfinite(video).all():
            raise ValueError("the video contains NaN or infinite values")

    # -- encode / decode -----------------------------------------------------------------------

    def posterior(self, video: torch.Tensor, chunk_frames: int | None = None,
                  tile: int | None = None, tile_overlap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-normalized latent Gaussian: (mean, logvar), each [B, c, 1 + k, h, w]."""
        self.check_video(video)
        s = self.spatial_factor
        moments = _tiled(lambda v: _chunked(self.encoder, v, chunk_frames, self.temporal_factor),
                         video, tile, tile_overlap, multiple=s, scale=1 / s)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, sample: bool = False, chunk_frames: int | None = None,
               tile: int | None = None, tile_overlap: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalized latent of `video` [B, C, 1 + f*k, H, W] (an image [B, C, H, W] gives
        [B, c, h, w]), values in [-1, 1]: the posterior mean, or a draw from it if `sample`.

        chunk_frames: a multiple of f; encodes 1 + chunk_frames frames, then chunk_frames at a
            time with a causal cache: the one-pass result at memory bounded by the chunk.
        tile, tile_overlap: encode square spatial tiles of `tile` pixels overlapping by
            `tile_overlap` (default tile / 4), blended linearly: approximate, for very large frames.
        """
        if video.ndim == 4:
            return self.encode(video[:, :, None], sample, chunk_frames, tile, tile_overlap, generator)[:, :, 0]
        mean, logvar = self.posterior(video, chunk_frames, tile, tile_overlap)
        if sample:
            mean = mean + (0.5 * logvar).exp() * _noise_like(mean, generator)
        return self.normalize(mean)

    def decode(self, latent: torch.Tensor, chunk_latents: int | None = None, tile: int | None = None,
               tile_overlap: int | None = None) -> torch.Tensor:
        """Pixels [B, C, 1 + f*k, H, W] from a normalized latent [B, c, 1 + k, h, w] (or an image
        from [B, c, h, w]). chunk_latents: decode 1 + chunk_latents latent frames, then that many
        at a time. tile, tile_overlap: spatial tiles in latent units, as for `encode`."""
        if latent.ndim == 4:
            return self.decode(latent[:, :, None], chunk_latents, tile, tile_overlap)[:, :, 0]
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"expected a latent [B, {self.latent_channels}, T, H, W], got shape {tuple(latent.shape)}")
        if not torch.isfinite(latent).all():
            raise ValueError("the latent contains NaN or infinite values")
        return _tiled(lambda z: _chunked(self.decoder, z, chunk_latents, 1), self.denormalize(latent),
                      tile, tile_overlap, multiple=1, scale=self.spatial_factor)

    def forward(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruction for training: (video_hat, mean, logvar), through an un-normalized latent."""
        mean, logvar = self.posterior(video)
        z = mean + (0.5 * logvar).exp() * _noise_like(mean, generator) if sample else mean
        return self.decoder(z), mean, logvar

    def normalize(self, mean: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (mean - self.latent_shift.view(shape)) / self.latent_scale.view(shape)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return latent * self.latent_scale.view(shape) + self.latent_shift.view(shape)

    @torch.no_grad()
    def fit_latent_stats(self, videos) -> None:
        """Set the per-channel shift and scale so that encoded latents of `videos` (an iterable of
        [B, C, T, H, W] tensors) have zero mean and unit variance per channel."""
        total, total_sq, count = 0.0, 0.0, 0
        for video in videos:
            mean, _ = self.posterior(video)
            flat = mean.transpose(0, 1).flatten(1).double()
            total = total + flat.sum(1)
            total_sq = total_sq + flat.square().sum(1)
            count += flat.shape[1]
        if count == 0:
            raise ValueError("fit_latent_stats needs at least one video")
        mu = total / count
        std = (total_sq / count - mu.square()).clamp(min=1e-12).sqrt()
        self.latent_shift.copy_(mu)
        self.latent_scale.copy_(std)

    # -- files ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: VAEConfig | dict | str | os.PathLike) -> "VideoVAE":
        if isinstance(cfg, VAEConfig):
            return cls(cfg)
        if isinstance(cfg, dict):
            return cls(from_dict(VAEConfig, cfg, source="vae config"))
        return cls(from_dict(VAEConfig, read_yaml(cfg), source=str(cfg)))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """`config.yaml` + `model.safetensors` (weights and the latent statistics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        save_config(self.config, directory / "config.yaml")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "VideoVAE":
        directory = Path(directory)
        weights = directory / "model.safetensors"
        if not (directory / "config.yaml").is_file() or not weights.is_file():
            raise ConfigError(f"{directory}: not a model directory (needs config.yaml and model.safetensors)")
        model = cls.from_config(directory / "config.yaml")
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise ConfigError(f"{weights}: unreadable weights ({e})") from None
        own = model.state_dict()
        mismatched = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected or mismatched:
            raise ConfigError(f"{weights}: weights do not match config.yaml (missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]}, other shapes {mismatched[:2]})")
        model.load_state_dict(state)
        return model


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x)


def _chunked(net: nn.Module, x: torch.Tensor, chunk: int | None, multiple: int) -> torch.Tensor:
    """Run `net` over time chunks of x with a causal stream: 1 + chunk frames, then chunk at a time."""
    if chunk is None:
        return net(x)
    if chunk < 1 or chunk % multiple:
        raise ValueError(f"chunk size must be a positive multiple of {multiple}, got {chunk}")
    stream, outputs, start = Stream(), [], 0
    while start < x.shape[2]:
        stop = start + chunk + (1 if start == 0 else 0)
        outputs.append(net(x[:, :, start:stop], stream))
        stream.first = False
        start = stop
    return torch.cat(outputs, dim=2)


def _tiled(fn, x: torch.Tensor, tile: int | None, overlap: int | None, multiple: int, scale: float) -> torch.Tensor:
    """Apply `fn` (which scales height and width by `scale`) to overlapping square tiles of x and
    blend the outputs with weights that ramp down linearly towards each tile's edges."""
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return fn(x)
    overlap = tile // 4 if overlap is None else overlap
    if tile % multiple or overlap % multiple or not 0 <= overlap < tile:
        raise ValueError(f"tile ({tile}) and tile_overlap ({overlap}) must be multiples of {multiple}, "
                         f"with 0 <= overlap < tile")

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        points = list(range(0, size - tile, tile - overlap))
        return points + [size - tile]

    out = weight_sum = None
    for top in starts(h):
        for left in starts(w):
            y = fn(x[..., top:top + tile, left:left + tile])
            th, tw = y.shape[-2:]
            ramp_h = _ramp(th, round(overlap * scale), y)
            ramp_w = _ramp(tw, round(overlap * scale), y)
            weight = ramp_h[:, None] * ramp_w[None, :]
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(h * scale), round(w * scale))
                weight_sum = y.new_zeros(round(h * scale), round(w * scale))
            t0, l0 = round(top * scale), round(left * scale)
            out[..., t0:t0 + th, l0:l0 + tw] += y * weight
            weight_sum[t0:t0 + th, l0:l0 + tw] += weight
    return out / weight_sum


def _ramp(size: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """1 in the middle, falling linearly to 1 / (overlap + 1) at both ends over `overlap` samples."""
    i = torch.arange(size, device=like.device, dtype=like.dtype)
    if overlap <= 0:
        return torch.ones_like(i)
    return torch.minimum(torch.ones_like(i), torch.minimum(i + 1, size - i) / (overlap + 1))
