"""DiT over latent spacetime patches, with factorized space-time attention (Sora / Latte / VDM).

Each block: spatial self-attention (frames folded into the batch), temporal self-attention
(spatial positions folded into the batch) with relative position information, cross-attention to
text, MLP. With `text_attention: joint` there is no cross-attention: the text tokens' keys and
values join those of the spatial attention (dit) or of the joint attention (dit3d), as in
CogVideoX, which saves the cross-attention's query and output projections over every token.
The text keys' logits are offset so that the caption's few keys and the video's many start with
equal shares of the attention (DiT.text_bias). The text keys carry no rotation, so with temporal
RoPE in dit3d a token's attention to the text depends on its frame's index (counted from the
clip's first frame): an absolute frame cue, as in CogVideoX; an image's frames all count as
frame 0. The noise level (and the cascade's conditioning-augmentation level, and pooled text)
conditions the blocks through adaLN-Zero, so an untrained model outputs exactly zero. Positions
are computed for the input's own frames, height and width: any latent size the patch divides.

    forward(z, logsnr, text=None, text_mask=None, cond=None, cond_logsnr=None, is_image=None, guidance=None)

`is_image` [B] bool restricts temporal attention to each frame itself (the VDM masking), so a
T-frame "video" of independent images gives, frame by frame, what T one-frame inputs give.
`guidance` [B] is the classifier-free guidance weight w of a guidance-distilled student
(`guidance_input: true`), embedded like the noise level into the adaLN vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import param
from .attention import attention
from .conditioning import Conditioning
from .embeddings import RelativePositionBias, apply_rope, rope_rotations, sincos_1d, sincos_2d

SIZES = {"tiny": (64, 2, 2), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


@dataclass
class DiTConfig:
    name: Literal["dit", "dit3d"] = "dit"  # dit: factorized space-time attention; dit3d: joint
    size: Literal["tiny", "S", "B", "L", "XL"] = "S"  # named (width, depth, heads); the three below override
    width: int | None = param(None, ge=8)
    depth: int | None = param(None, ge=1)
    heads: int | None = param(None, ge=1)
    in_channels: int = param(4, ge=1)
    out_channels: int | None = param(None, ge=1)  # default: in_channels
    cond_channels: int = param(0, ge=0)  # cascade stages: channels of the upsampled low-res latent
    text_dim: int = param(0, ge=0)  # 0: no text conditioning
    text_attention: Literal["cross", "joint"] = "cross"  # joint: text keys in the self-attention (above)
    text_pool: Literal["mlp", "linear"] = "mlp"  # how pooled text joins the adaLN vector (models.conditioning)
    patch: tuple[int, int, int] = (1, 2, 2)  # (time, height, width)
    mlp_ratio: float = param(4.0, gt=0)
    spatial_positions: Literal["sincos", "rope"] = "sincos"
    temporal_positions: Literal["rope", "t5_bias"] = "rope"
    # Relative temporal positions tell a token which frame of the clip it is in only through the
    # clip's ends (and RoPE spatial positions where it is only through the frame's edges): a weak
    # cue for text that sets the layout over time ("moving right": left at the start, right at
    # the end). "sincos" adds each frame's index to its tokens, counted from the clip's first frame.
    frame_positions: Literal["none", "sincos"] = "none"
    base_grid: int = param(16, ge=1)  # sin-cos positions are scaled so that this many patches span the frame
    attention_backend: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    gradient_checkpointing: bool = False
    guidance_input: bool = False  # a guidance-distilled student: forward takes w (guidance=[B])

    def __post_init__(self):
        named = dict(zip(("width", "depth", "heads"), SIZES[self.size]))
        for key, value in named.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if min(self.patch) < 1:
            raise ValueError(f"patch sizes must be >= 1, got {self.patch}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of a multiple of 4 channels")
        if self.name == "dit3d" and self.spatial_positions == self.temporal_positions == "rope" \
                and (self.width // self.heads) % 8:
            raise ValueError(f"dit3d with RoPE in space and time rotates half of each head's channels by the "
                             f"frame and a quarter each by row and column, in pairs: width {self.width} must split "
                             f"into {self.heads} heads of a multiple of 8 channels")


def joint_text(cfg: DiTConfig) -> bool:
    return cfg.text_dim > 0 and cfg.text_attention == "joint"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Self-attention over x's tokens; with `text` (made with text=True), the text tokens' keys
    and values join x's, without positions, each text key's logit offset by `text_bias` [B, L_text]
    (-inf behind the text mask; see DiT.text_bias)."""

    def __init__(self, width: int, heads: int, backend: str, text: bool = False):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.text_kv = nn.Linear(width, 2 * width) if text else None
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if rope is None:
            q, k, v = qkv
        else:  # q and k rotated in one pass. split, not indexing: its backward is one concatenation,
            qk, v = qkv.split([2, 1])  # where indexing's zero-fills a copy of qkv for each part
            (q, k), v = apply_rope(qk, rope), v.squeeze(0)
        if self.text_kv is not None:
            # projected once per sample; x's batch may hold several groups of one sample (the
            # frames of the factorized spatial attention), each attending to that sample's text
            text_k, text_v = rearrange(self.text_kv(text), "b l (two h d) -> two b h l d", two=2, h=self.heads)
            groups = q.shape[0] // text.shape[0]
            text_k, text_v, text_bias = (a.repeat_interleave(groups, dim=0) for a in (text_k, text_v, text_bias))
            k, v = torch.cat([k, text_k], dim=2), torch.cat([v, text_v], dim=2)
            joined = F.pad(text_bias[:, None, None, :], (x.shape[1], 0))  # 0 for x's keys: [B, 1, 1, L + L_text]
            bias = joined if bias is None else F.pad(bias, (0, text.shape[1])) + joined
        out = attention(q, k, v, bias=bias, backend=self.backend)
        return self.out(rearrange(out, "b h l d -> b l (h d)"))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        return self.out(rearrange(attention(q, k, v, key_mask=mask, backend=self.backend), "b h l d -> b l (h d)"))


class Block(nn.Module):
    """What both block kinds end with: cross-attention to text behind a plain LayerNorm (unless
    the text joins the self-attention), then an MLP with adaLN-Zero; and their adaLN projection,
    zero-initialized, of `chunks` x width."""

    def __init__(self, cfg: DiTConfig, chunks: int):
        super().__init__()
        w = cfg.width
        cross = cfg.text_dim > 0 and cfg.text_attention == "cross"
        self.cross = CrossAttention(w, cfg.heads, cfg.attention_backend) if cross else None
        self.norm_c = nn.LayerNorm(w, eps=1e-6) if cross else None
        self.norm_m = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(w, int(w * cfg.mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, chunks * w))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def text_in_attention(self, text, positions) -> dict:
        """The text arguments of the self-attention: the text when it joins it, else none."""
        return {} if self.cross is not None or text is None else {"text": text, "text_bias": positions["text_bias"]}

    def text_and_mlp(self, x, text, text_mask, m_shift, m_scale, m_gate):
        if self.cross is not None:
            h = self.cross(rearrange(self.norm_c(x), "b t n w -> b (t n) w"), text, text_mask)
            x = x + rearrange(h, "b (t n) w -> b t n w", t=x.shape[1])
        return x + m_gate * self.mlp(modulate(self.norm_m(x), m_shift, m_scale))


class FactorizedBlock(Block):
    """Spatial attention, temporal attention, cross-attention, MLP; adaLN-Zero on the first two
    and the MLP (shift, scale, gate each)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg, chunks=9)
        w, h = cfg.width, cfg.heads
        self.norm_s, self.norm_t = (nn.LayerNorm(w, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.spatial = SelfAttention(w, h, cfg.attention_backend, text=joint_text(cfg))
        # The zero gate t_gate (adaLN-Zero) already makes the new temporal layer start as the
        # identity. Zeroing its output projection as well would leave both factors of
        # t_gate * temporal(h) at zero with zero gradient: the layer would never train.
        self.temporal = SelfAttention(w, h, cfg.attention_backend)

    def forward(self, x, c, positions, text=None, text_mask=None):
        """x [B, T, N, W] tokens (T frames of N patches), c [B, W]."""
        b, t, n, _ = x.shape
        s_shift, s_scale, s_gate, t_shift, t_scale, t_gate, m_shift, m_scale, m_gate = (
            p[:, None, None] for p in self.ada(c).chunk(9, dim=-1))
        h = rearrange(modulate(self.norm_s(x), s_shift, s_scale), "b t n w -> (b t) n w")
        h = self.spatial(h, rope=positions["spatial_rope"], bias=positions["spatial_bias"],
                         **self.text_in_attention(text, positions))
        x = x + s_gate * rearrange(h, "(b t) n w -> b t n w", b=b)
        h = rearrange(modulate(self.norm_t(x), t_shift, t_scale), "b t n w -> (b n) t w")
        h = self.temporal(h, rope=positions["temporal_rope"], bias=positions["temporal_bias"])
        x = x + t_gate * rearrange(h, "(b n) t w -> b t n w", b=b)
        return self.text_and_mlp(x, text, text_mask, m_shift, m_scale, m_gate)


class JointBlock(Block):
    """The dit3d block: one self-attention over all frames' patches together, then
    cross-attention and MLP; adaLN-Zero on the attention and the MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg, chunks=6)
        self.norm_a = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg.width, cfg.heads, cfg.attention_backend, text=joint_text(cfg))

    def forward(self, x, c, positions, text=None, text_mask=None):
        t = x.shape[1]
        a_shift, a_scale, a_gate, m_shift, m_scale, m_gate = (p[:, None, None] for p in self.ada(c).chunk(6, dim=-1))
        h = rearrange(modulate(self.norm_a(x), a_shift, a_scale), "b t n w -> b (t n) w")
        h = self.attn(h, rope=positions["joint_rope"], bias=positions["joint_bias"],
                      **self.text_in_attention(text, positions))
        x = x + a_gate * rearrange(h, "b (t n) w -> b t n w", t=t)
        return self.text_and_mlp(x, text, text_mask, m_shift, m_scale, m_gate)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.in_channels, self.cond_channels, self.text_dim = cfg.in_channels, cfg.cond_channels, cfg.text_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.patch_embed = nn.Conv3d(cfg.in_channels + cfg.cond_channels, w, cfg.patch, stride=cfg.patch)
        self.conditioning = Conditioning(w, w, cfg.cond_channels > 0, cfg.text_dim, w, cfg.guidance_input,
                                         cfg.text_pool)
        self.temporal_bias = RelativePositionBias(cfg.heads) if cfg.temporal_positions == "t5_bias" else None
        block = FactorizedBlock if cfg.name == "dit" else JointBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.proj_out = nn.Linear(w, self.out_channels * cfg.patch[0] * cfg.patch[1] * cfg.patch[2])
        for layer in (self.ada_out[1], self.proj_out):  # adaLN-Zero: the untrained model outputs 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, logsnr, text=None, text_mask=None, cond=None, cond_logsnr=None, is_image=None,
                guidance=None):
        cfg = self.config
        b, _, t, h, w = z.shape
        pt, ph, pw = cfg.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent {t}x{h}x{w} is not divisible by the patch {pt}x{ph}x{pw}")
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(f"this model takes cond with {cfg.cond_channels} channels; got "
                             f"{'none' if cond is None else tuple(cond.shape)}")
        x = self.patch_embed(z if cond is None else torch.cat([z, cond.to(z.dtype)], dim=1))
        gt, gh, gw = x.shape[2:]
        # contiguous: as a view of the conv output, the residual stream would stay channel-major
        # through every block (elementwise ops keep their input's layout), and each LayerNorm
        # and Linear would copy it first; that made a training step ~10% slower on CPU
        x = rearrange(x, "b w t h v -> b t (h v) w").contiguous()

        c, context, mask = self.conditioning(logsnr, cond_logsnr, text, text_mask, b, x.dtype, guidance)

        positions = self._positions(gt, gh, gw, x)
        if cfg.spatial_positions == "sincos":
            x = x + sincos_2d(gh, gw, cfg.width, scale=cfg.base_grid / max(gh, gw), device=x.device).to(x.dtype)
        if cfg.frame_positions == "sincos":
            frames = sincos_1d(torch.arange(gt, device=x.device, dtype=torch.float32), cfg.width)[:, None]
            if is_image is not None:  # an image's frames are each a clip's first frame
                frames = torch.where(is_image[:, None, None, None], frames[:1], frames)
            x = x + frames.to(x.dtype)
        if is_image is not None and is_image.any():
            if cfg.name == "dit":
                positions["temporal_bias"] = self._image_mask(is_image, gh * gw, gt, positions["temporal_bias"], x)
            else:
                positions["joint_bias"] = self._joint_image_mask(is_image, gh * gw, gt, positions["joint_bias"], x)
                if joint_text(cfg) and positions["temporal_rope"] is not None:
                    positions["joint_rope"] = self._joint_image_rope(is_image, positions)
        if joint_text(cfg):
            keys = torch.full((b,), gh * gw if cfg.name == "dit" else gt * gh * gw, device=x.device)
            if cfg.name == "dit3d" and is_image is not None:
                keys = torch.where(is_image, gh * gw, keys)  # an image's tokens see their own frame only
            positions["text_bias"] = self.text_bias(mask, keys)
        for block in self.blocks:
            if cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, c, positions, context, mask, use_reentrant=False)
            else:
                x = block(x, c, positions, context, mask)
        shift, scale = self.ada_out(c)[:, None, None].chunk(2, dim=-1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))
        return rearrange(x, "b t (h v) (c pt ph pw) -> b c (t pt) (h ph) (v pw)",
                         h=gh, v=gw, pt=pt, ph=ph, pw=pw)

    def _positions(self, gt: int, gh: int, gw: int, x: torch.Tensor, first_frame: int = 0) -> dict:
        """RoPE rotations and biases for this grid (nothing is tied to one size), made once per
        forward for every block. Factorized blocks use the spatial_* and temporal_* entries,
        joint blocks the joint_* ones, where each token's rotations are those of its frame and,
        with spatial RoPE, of its row and column (the head's channels split between them).
        `first_frame` numbers the frames from there; with relative temporal positions it changes
        nothing, which the tests check. (`text_bias`, for joint text attention, is the forward's.)"""
        cfg, head_dim = self.config, self.config.width // self.config.heads
        out = dict.fromkeys(["spatial_rope", "spatial_bias", "temporal_rope", "temporal_bias",
                             "joint_rope", "joint_bias", "text_bias"])
        ys, xs = (g.flatten() for g in torch.meshgrid(torch.arange(gh, device=x.device),
                                                      torch.arange(gw, device=x.device), indexing="ij"))
        frames = torch.arange(first_frame, first_frame + gt, device=x.device)
        spatial_dim = head_dim if cfg.temporal_positions == "t5_bias" or cfg.name == "dit" else head_dim // 2
        if cfg.spatial_positions == "rope":
            out["spatial_rope"] = torch.cat([rope_rotations(ys, spatial_dim // 2),
                                             rope_rotations(xs, spatial_dim // 2)], dim=-2)
        if cfg.temporal_positions == "rope":
            time_dim = head_dim if cfg.name == "dit" or cfg.spatial_positions == "sincos" else head_dim // 2
            out["temporal_rope"] = rope_rotations(frames, time_dim)
        else:
            out["temporal_bias"] = self.temporal_bias(frames, frames).to(x.dtype)
        if cfg.name == "dit3d":
            per_token = [a.repeat(gt, 1, 1) for a in [out["spatial_rope"]] if a is not None]
            if out["temporal_rope"] is not None:
                per_token.insert(0, out["temporal_rope"].repeat_interleave(gh * gw, dim=0))
            out["joint_rope"] = torch.cat(per_token, dim=-2) if per_token else None
            if out["temporal_bias"] is not None:
                out["joint_bias"] = out["temporal_bias"].repeat_interleave(gh * gw, 2).repeat_interleave(gh * gw, 3)
        return out

    @staticmethod
    def text_bias(text_mask: torch.Tensor, video_keys: torch.Tensor) -> torch.Tensor:
        """Joint text attention's logit offset for each text key [B, L_text]: log(video keys a
        token sees / unmasked text keys), -inf behind the mask. At equal logits a token then gives
        half its attention to the video and half to the text, at any number of frames and patches.
        Without it a clip's thousands of patch keys outnumber a caption's few (in the tiny A/B,
        9216 patches against about 51 caption bytes: 0.5% of the attention at init), and the text
        must win its share with large logits."""
        valid = text_mask.sum(1).clamp(min=1)  # Conditioning leaves at least one (the null text)
        offset = video_keys.float().log() - valid.float().log()
        return offset[:, None].expand(text_mask.shape).masked_fill(~text_mask, float("-inf"))

    @staticmethod
    def _image_mask(is_image, n, gt, base, x):
        """The temporal bias plus -inf off the diagonal for image samples: their frames attend
        only to themselves."""
        eye = torch.eye(gt, dtype=torch.bool, device=x.device)
        allowed = torch.where(is_image[:, None, None], eye, torch.ones_like(eye))  # [B, T, T]
        block = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        block = block.repeat_interleave(n, dim=0)[:, None]  # [(B N), 1, T, T], the temporal batch order
        return block if base is None else block + base

    @staticmethod
    def _joint_image_rope(is_image, positions):
        """Rotations per sample [B, 1, L, dim / 2, 2] in which an image sample's frames all sit at
        frame 0. Between tokens of one frame the temporal rotations cancel, but the text keys
        carry none: without this an image's attention to its text would depend on its slot."""
        rope = positions["joint_rope"]
        still = rope.clone()
        still[..., :positions["temporal_rope"].shape[-2], :] = rope.new_tensor([1.0, 0.0])  # temporal pairs first
        return torch.where(is_image[:, None, None, None, None], still, rope)

    @staticmethod
    def _joint_image_mask(is_image, n, gt, base, x):
        """For joint attention: image samples' tokens attend only within their own frame."""
        frame = torch.arange(gt, device=x.device).repeat_interleave(n)
        same = frame[:, None] == frame[None, :]
        allowed = torch.where(is_image[:, None, None], same, torch.ones_like(same))  # [B, TN, TN]
        block = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        return block[:, None] if base is None else block[:, None] + base
