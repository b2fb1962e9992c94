"""Analytic FLOPs of a backbone's forward pass: the matrix products (2 m n k each), which is
what dominates and what `torch.utils.flop_counter` counts. Used for MFU and for comparing
factorized against joint attention at equal shapes."""

from __future__ import annotations

from torch import nn

from .dit import DiT


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, shape: tuple[int, int, int, int, int], text_len: int = 0) -> float:
    """FLOPs of one forward of `model` on latents of `shape` [B, C, T, H, W] (with `text_len`
    text tokens when the model takes text)."""
    if isinstance(model, DiT):
        return _dit_flops(model, shape, text_len)
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
        flops += linear(b * text_len, cfg.text_dim, width) + 2 * linear(b, width, width)
    per_block = linear(b * tokens, width, hidden) + linear(b * tokens, hidden, width)  # MLP
    if cfg.name == "dit":
        per_block += linear(b, width, 9 * width)
        per_block += 2 * (linear(b * tokens, width, 3 * width) + linear(b * tokens, width, width))
        per_block += attention_core(b * frames, n, n) + attention_core(b * n, frames, frames)
    else:
        per_block += linear(b, width, 6 * width)
        per_block += linear(b * tokens, width, 3 * width) + linear(b * tokens, width, width)
        per_block += attention_core(b, tokens, tokens)
    if cfg.text_dim:
        per_block += 2 * linear(b * tokens, width, width) + linear(b * text_len, width, 2 * width)
        per_block += attention_core(b, tokens, text_len)
    flops += cfg.depth * per_block
    flops += linear(b, width, 2 * width) + linear(b * tokens, width, model.out_channels * pt * ph * pw)
    return flops
