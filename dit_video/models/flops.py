"""Analytic FLOPs of a backbone's forward pass: the matrix products (2 m n k each), which is
what dominates and what `torch.utils.flop_counter` counts. Used for MFU and for comparing
factorized against joint attention at equal shapes."""

from __future__ import annotations

import math

from torch import nn

from .dit import DiT
from .unet3d import AttentionBlock, Level, ResBlock, UNet3D


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, shape: tuple[int, int, int, int, int], text_len: int = 0) -> float:
    """FLOPs of one forward of `model` on latents of `shape` [B, C, T, H, W] (with `text_len`
    text tokens when the model takes text)."""
    if isinstance(model, DiT):
        return _dit_flops(model, shape, text_len)
    if isinstance(model, UNet3D):
        return _unet_flops(model, shape, text_len)
    raise TypeError(f"no FLOP formula for {type(model).__name__}")


def _dit_flops(model: DiT, shape, text_len: int) -> float:
    cfg = model.config
    b, _, t, h, w = shape
    pt, ph, pw = cfg.patch
    frames, n = t // pt, (h // ph) * (w // pw)
    tokens = frames * n  # per sample
    width, heads = cfg.width, cfg.heads
    d = width // heads
    hidden = int(width * cfg.mlp_ratio)
    patch_in = (cfg.in_channels + cfg.cond_channels) * pt * ph * pw

    def linear(rows, k, m):  # rows x k @ k x m
        return 2.0 * rows * k * m

    def attention_core(groups, lq, lk):  # QK^T and AV over heads
        return 2 * 2.0 * groups * heads * lq * lk * d

    flops = linear(b * tokens, patch_in, width)
    flops += 2 * linear(b, width, width)  # noise-level MLP
    if cfg.cond_channels:
        flops += 2 * linear(b, width, width)
    text_len = max(text_len, 1) if cfg.text_dim else 0  # no text: the one-token null embedding
    if cfg.text_dim:
        flops += linear(b * text_len, cfg.text_dim, width) + (2 if cfg.text_pool == "mlp" else 1) * linear(b, width, width)
    per_block = linear(b * tokens, width, hidden) + linear(b * tokens, hidden, width)  # MLP
    if cfg.name == "dit":
        per_block += linear(b, width, 9 * width)
        per_block += 2 * (linear(b * tokens, width, 3 * width) + linear(b * tokens, width, width))
        per_block += attention_core(b * frames, n, n) + attention_core(b * n, frames, frames)
    else:
        per_block += linear(b, width, 6 * width)
        per_block += linear(b * tokens, width, 3 * width) + linear(b * tokens, width, width)
        per_block += attention_core(b, tokens, tokens)
    if cfg.text_dim:  # keys and values of the text, and the attention of every token to them
        per_block += linear(b * text_len, width, 2 * width) + attention_core(b, tokens, text_len)
        if cfg.text_attention == "cross":  # its own query and output projections
            per_block += 2 * linear(b * tokens, width, width)
    flops += cfg.depth * per_block
    flops += linear(b, width, 2 * width) + linear(b * tokens, width, model.out_channels * pt * ph * pw)
    return flops


def _unet_flops(model: UNet3D, shape, text_len: int) -> float:
    """Walks the U-Net level by level with the resolution each level runs at; channel counts
    are read off the layers themselves, so the count follows the architecture."""
    cfg = model.config
    b, _, t, h, w = shape
    text_len = max(text_len, 1) if cfg.text_dim else 0

    def conv(layer, pixels: int) -> float:  # pixels: output positions per sample
        c_out, c_in, *kernel = layer.weight.shape
        return 2.0 * b * pixels * c_in * c_out * math.prod(kernel)

    def linear(layer, rows: int) -> float:
        return 2.0 * rows * layer.in_features * layer.out_features

    def res_block(block: ResBlock, pixels: int) -> float:
        flops = conv(block.conv1, pixels) + conv(block.conv2, pixels) + linear(block.emb, b)
        if block.temporal is not None:
            flops += conv(block.temporal, pixels)
        if not isinstance(block.skip, nn.Identity):
            flops += conv(block.skip, pixels)
        return flops

    def attention_block(block: AttentionBlock, hw: int) -> float:
        c = block.qkv_s.in_features
        d = c // block.heads
        tokens = b * t * hw
        flops = 2 * (linear(block.qkv_s, tokens) + linear(block.out_s, tokens))
        flops += 2 * 2.0 * b * t * block.heads * hw * hw * d + 2 * 2.0 * b * hw * block.heads * t * t * d
        if block.text:
            flops += linear(block.q_c, tokens) + linear(block.out_c, tokens) + linear(block.kv_c, b * text_len)
            flops += 2 * 2.0 * b * block.heads * t * hw * text_len * d
        return flops

    def level(lv: Level, hw: int) -> float:
        flops = sum(res_block(r, t * hw) for r in lv.res)
        return flops + sum(attention_block(a, hw) for a in lv.attn if isinstance(a, AttentionBlock))

    cond = model.conditioning
    flops = linear(cond.noise.fc1, b) + linear(cond.noise.fc2, b)
    if cond.cond_noise is not None:
        flops += linear(cond.cond_noise.fc1, b) + linear(cond.cond_noise.fc2, b)
    if cfg.text_dim:
        flops += linear(cond.text_proj, b * text_len) + sum(linear(m, b) for m in cond.text_pool.modules()
                                                             if isinstance(m, nn.Linear))
        flops += sum(linear(layer, b * text_len) for layer in model.text_to_level.values())
    flops += conv(model.conv_in, t * h * w) + conv(model.conv_out, t * h * w)
    hh, ww = h, w
    for i, lv in enumerate(model.down):
        flops += level(lv, hh * ww)
        if i < len(model.downsample):
            hh, ww = hh // 2, ww // 2
            flops += conv(model.downsample[i], t * hh * ww)
    flops += level(model.mid, hh * ww)
    for k, lv in enumerate(model.up):
        flops += level(lv, hh * ww)
        if k < len(model.upsample):
            hh, ww = hh * 2, ww * 2
            flops += conv(model.upsample[k], t * hh * ww)
    return flops
