"""Scaled dot-product attention behind one function, on three backends.

    out = attention(q, k, v, bias=None, key_mask=None, backend="auto")

q [B, H, Lq, D], k and v [B, H, Lk, D]; `bias` an additive [B or 1, H or 1, Lq, Lk] tensor
(relative position bias), `key_mask` a bool [B, Lk] (True = attend), e.g. padded text tokens.

- "math": the reference, softmax(q k^T / sqrt(D) + bias) v computed in float32.
- "sdpa": torch.nn.functional.scaled_dot_product_attention, on any device.
- "xformers": xformers' memory-efficient attention, CUDA only.
- "auto": xformers on CUDA when it imports and runs, else sdpa; the choice is logged once.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")
log = logging.getLogger(__name__)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need q [B, H, Lq, D] and k, v [B, H, Lk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    bias = _combine(bias, key_mask, q)
    if backend == "auto":
        backend = resolve_backend(q.device)
    if backend == "math":
        return _math(q, k, v, bias)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return _xformers(q, k, v, bias)


def _combine(bias: torch.Tensor | None, key_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """One additive bias in q's dtype: the given bias plus -inf where keys are masked out."""
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.ndim != 2:
            raise ValueError(f"key_mask must be a bool [B, Lk] tensor, got {key_mask.dtype} {tuple(key_mask.shape)}")
        masked = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
        masked = masked[:, None, None, :]
        bias = masked if bias is None else bias.to(q.dtype) + masked
    return None if bias is None else bias.to(q.dtype)


def _math(q, k, v, bias):
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _xformers(q, k, v, bias):
    if q.device.type != "cuda":
        raise RuntimeError("the xformers attention backend runs on CUDA only; use 'sdpa' or 'auto'")
    import xformers.ops as xops

    if bias is not None:
        # xformers wants the bias's last dim padded to a multiple of 8 in memory; a view of a
        # padded tensor keeps the logical shape.
        lk = bias.shape[-1]
        padded = bias.new_zeros(*bias.shape[:-1], (lk + 7) // 8 * 8)
        padded[..., :lk] = bias
        bias = padded[..., :lk].expand(q.shape[0], q.shape[1], q.shape[2], lk)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def resolve_backend(device: torch.device) -> str:
    """What "auto" means on `device`: xformers if it imports and a small call runs there, else
    sdpa. Decided once per device and logged, with the reason when xformers is passed over."""
    if device.type != "cuda":
        log.info("attention backend: sdpa (device %s)", device)
        return "sdpa"
    try:
        q = torch.randn(1, 1, 8, 16, device=device, dtype=torch.float16)
        _xformers(q, q, q, None)
    except Exception as e:  # ImportError, a missing CUDA extension, an unsupported GPU...
        log.warning("attention backend: sdpa (xformers unavailable on %s: %s)", device, str(e).splitlines()[0])
        return "sdpa"
    log.info("attention backend: xformers on %s", device)
    return "xformers"
