"""The 3D U-Net of Video Diffusion Models (Ho et al. 2022), behind the same interface as the DiT.

Space-only convolutions (1x3x3) in residual blocks, spatial attention at the configured
levels, temporal attention with a T5 relative position bias after it, cross-attention to text,
spatial down- and upsampling with skip connections. Optional 3x1x1 temporal convolutions after
the spatial ones, as in Imagen Video's super-resolution models. Normalization is per frame and
`is_image` restricts temporal attention (and skips temporal convolutions) for image samples, so
frames of an image batch are processed independently. `guidance_input: true` adds the guidance
weight w of a guidance-distilled student to the conditioning vector (forward's `guidance` [B]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import param
from ..frames import FrameNorm, per_frame
from .attention import attention
from .conditioning import Conditioning
from .embeddings import RelativePositionBias


@dataclass
class UNet3DConfig:
    name: Literal["unet3d"] = "unet3d"
    in_channels: int = param(4, ge=1)
    out_channels: int | None = param(None, ge=1)  # default: in_channels
    cond_channels: int = param(0, ge=0)
    text_dim: int = param(0, ge=0)
    text_pool: Literal["mlp", "linear"] = "mlp"  # how pooled text joins the embedding (models.conditioning)
    channels: int = param(128, ge=8)  # width of the first level
    channel_mult: list[int] = param(default_factory=lambda: [1, 2, 4], ge=1)
    blocks_per_level: int = param(2, ge=1)
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # levels with attention
    head_dim: int = param(64, ge=8)
    temporal_conv: bool = False  # 3x1x1 convolutions after the spatial ones (Imagen Video SR)
    norm_groups: int = param(32, ge=1)
    attention_backend: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    gradient_checkpointing: bool = False
    guidance_input: bool = False  # a guidance-distilled student: forward takes w (guidance=[B])

    def __post_init__(self):
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} are not levels of channel_mult (0..{len(self.channel_mult) - 1})")
        for c in self.level_channels:
            if c % min(self.norm_groups, c) or c % self.head_dim and self.attention_levels:
                raise ValueError(f"level width {c} must be divisible by norm_groups and head_dim")

    @property
    def level_channels(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 1x3x3 conv (+ 3x1x1 conv), with the conditioning as a scale and shift."""

    def __init__(self, c_in: int, c_out: int, cfg: UNet3DConfig, width: int):
        super().__init__()
        groups = lambda c: min(cfg.norm_groups, c)  # noqa: E731
        self.norm1 = FrameNorm(groups(c_in), c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, (1, 3, 3), padding=(0, 1, 1))
        self.emb = nn.Linear(width, 2 * c_out)
        self.norm2 = FrameNorm(groups(c_out), c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, (1, 3, 3), padding=(0, 1, 1))
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0)) if cfg.temporal_conv else None
        if self.temporal is not None:
            nn.init.zeros_(self.temporal.weight)  # starts as the identity (it is residual)
            nn.init.zeros_(self.temporal.bias)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, c, is_image):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(c))[:, :, None, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        if self.temporal is not None:
            mixed = self.temporal(h)
            if is_image is not None and is_image.any():
                # an image is a one-frame video, which sees only the kernel's centre tap (the
                # others meet the zero padding): each of its frames gets just that
                alone = F.conv3d(h, self.temporal.weight[:, :, 1:2], self.temporal.bias)
                mixed = torch.where(is_image[:, None, None, None, None], alone, mixed)
            h = h + mixed
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention per frame, temporal self-attention per position (T5 relative
    bias, image samples masked to themselves), then cross-attention to text."""

    def __init__(self, c: int, cfg: UNet3DConfig):
        super().__init__()
        self.heads, self.backend = c // cfg.head_dim, cfg.attention_backend
        groups = min(cfg.norm_groups, c)
        self.norm_s, self.norm_t = FrameNorm(groups, c), FrameNorm(groups, c)
        self.qkv_s, self.out_s = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.qkv_t, self.out_t = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.bias_t = RelativePositionBias(self.heads)
        for layer in (self.out_s, self.out_t):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.text = cfg.text_dim > 0
        if self.text:
            self.norm_c = FrameNorm(groups, c)
            self.q_c, self.kv_c, self.out_c = nn.Linear(c, c), nn.Linear(c, 2 * c), nn.Linear(c, c)
            nn.init.zeros_(self.out_c.weight)
            nn.init.zeros_(self.out_c.bias)

    def _attend(self, tokens, qkv, out, bias=None):
        q, k, v = rearrange(qkv(tokens), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return out(rearrange(attention(q, k, v, bias=bias, backend=self.backend), "b h l d -> b l (h d)"))

    def forward(self, x, context, context_mask, is_image):
        b, c, t, h, w = x.shape
        tokens = rearrange(self.norm_s(x), "b c t h w -> (b t) (h w) c")
        x = x + rearrange(self._attend(tokens, self.qkv_s, self.out_s), "(b t) (h w) c -> b c t h w", b=b, h=h)
        frames = torch.arange(t, device=x.device)
        bias = self.bias_t(frames, frames).to(x.dtype)
        if is_image is not None and is_image.any():
            eye = torch.eye(t, dtype=torch.bool, device=x.device)
            allowed = torch.where(is_image[:, None, None], eye, torch.ones_like(eye))
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
            bias = bias + mask.repeat_interleave(h * w, dim=0)[:, None]
        tokens = rearrange(self.norm_t(x), "b c t h w -> (b h w) t c")
        x = x + rearrange(self._attend(tokens, self.qkv_t, self.out_t, bias), "(b h w) t c -> b c t h w", b=b, h=h)
        if self.text:
            q = rearrange(self.q_c(rearrange(self.norm_c(x), "b c t h w -> b (t h w) c")),
                          "b l (h d) -> b h l d", h=self.heads)
            k, v = rearrange(self.kv_c(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
            y = attention(q, k, v, key_mask=context_mask, backend=self.backend)
            x = x + rearrange(self.out_c(rearrange(y, "b h l d -> b l (h d)")), "b (t h w) c -> b c t h w", t=t, h=h)
        return x


class Level(nn.Module):
    """The blocks of one resolution (residual blocks, each followed by attention if enabled)."""

    def __init__(self, channels_in: list[int], c_out: int, cfg: UNet3DConfig, width: int, with_attention: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in, c_out, cfg, width) for c_in in channels_in)
        self.attn = nn.ModuleList(AttentionBlock(c_out, cfg) if with_attention else nn.Identity() for _ in channels_in)


class UNet3D(nn.Module):
    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        self.in_channels, self.cond_channels, self.text_dim = cfg.in_channels, cfg.cond_channels, cfg.text_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        width = 4 * cfg.channels  # the conditioning vector
        chans = cfg.level_channels
        # text is projected to the deepest width, then to each attention level's (text_to_level)
        self.conditioning = Conditioning(cfg.channels, width, cfg.cond_channels > 0, cfg.text_dim, chans[-1],
                                         cfg.guidance_input, cfg.text_pool)
        self.conv_in = nn.Conv3d(cfg.in_channels + cfg.cond_channels, chans[0], (1, 3, 3), padding=(0, 1, 1))
        # only the levels that attend to text get a projection: an unused one would never train
        self.text_levels = sorted(set(cfg.attention_levels) | {len(chans) - 1})
        self.text_to_level = nn.ModuleDict({str(i): nn.Linear(chans[-1], chans[i]) for i in self.text_levels}
                                           if cfg.text_dim else {})

        self.down, self.downsample, skips, c = nn.ModuleList(), nn.ModuleList(), [chans[0]], chans[0]
        for i, c_out in enumerate(chans):
            level = Level([c] + [c_out] * (cfg.blocks_per_level - 1), c_out, cfg, width, i in cfg.attention_levels)
            self.down.append(level)
            skips += [c_out] * cfg.blocks_per_level
            c = c_out
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = Level([c, c], c, cfg, width, True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c_out in reversed(list(enumerate(chans))):
            ins = []
            for _ in range(cfg.blocks_per_level + 1):
                ins.append(c + skips.pop())
                c = c_out
            self.up.append(Level(ins, c_out, cfg, width, i in cfg.attention_levels))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = FrameNorm(min(cfg.norm_groups, c), c)
        self.conv_out = nn.Conv3d(c, self.out_channels, (1, 3, 3), padding=(0, 1, 1))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z, logsnr, text=None, text_mask=None, cond=None, cond_logsnr=None, is_image=None,
                guidance=None):
        cfg = self.config
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if z.shape[-1] % factor or z.shape[-2] % factor:
            raise ValueError(f"latent {z.shape[-2]}x{z.shape[-1]} is not divisible by {factor} (the U-Net's depth)")
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(f"this model takes cond with {cfg.cond_channels} channels; got "
                             f"{'none' if cond is None else tuple(cond.shape)}")
        c, context, mask = self.conditioning(logsnr, cond_logsnr, text, text_mask, z.shape[0], z.dtype,
                                             guidance)

        # the text context in each attention level's width, projected once per forward
        contexts = {i: None if context is None else self.text_to_level[str(i)](context) for i in self.text_levels}

        def block(level: Level, i: int, x: torch.Tensor, level_index: int) -> torch.Tensor:
            x = level.res[i](x, c, is_image)
            if isinstance(level.attn[i], nn.Identity):
                return x
            return level.attn[i](x, contexts[level_index], mask, is_image)

        def step(level: Level, i: int, x: torch.Tensor, level_index: int) -> torch.Tensor:
            if cfg.gradient_checkpointing and self.training:
                return checkpoint(block, level, i, x, level_index, use_reentrant=False)
            return block(level, i, x, level_index)

        x = self.conv_in(z if cond is None else torch.cat([z, cond.to(z.dtype)], dim=1))
        skips = [x]
        for li, level in enumerate(self.down):
            for i in range(len(level.res)):
                x = step(level, i, x, li)
                skips.append(x)
            if li < len(self.downsample):
                x = per_frame(self.downsample[li], x)
                skips.append(x)
        deepest = len(self.down) - 1
        x = step(self.mid, 1, step(self.mid, 0, x, deepest), deepest)
        for k, level in enumerate(self.up):
            li = len(self.up) - 1 - k
            for i in range(len(level.res)):
                x = step(level, i, torch.cat([x, skips.pop()], dim=1), li)
            if k < len(self.upsample):
                x = per_frame(lambda f, conv=self.upsample[k]: conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)
        return self.conv_out(F.silu(self.norm_out(x)))
