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


def _xformers_inputs(q, k, v, bias):
    """q, k, v in xformers' [B, L, H, D] layout, and the bias as it wants it: a view of a tensor
    whose last dim is padded to a multiple of 8 in memory, expanded to the full shape."""
    if bias is not None:
        lk = bias.shape[-1]
        padded = bias.new_zeros(*bias.shape[:-1], (lk + 7) // 8 * 8)
        padded[..., :lk] = bias
        bias = padded[..., :lk].expand(q.shape[0], q.shape[1], q.shape[2], lk)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias


def _xformers(q, k, v, bias):
    if q.device.type != "cuda":
        raise RuntimeError("the xformers attention backend runs on CUDA only; use 'sdpa' or 'auto'")
    import xformers.ops as xops

    q, k, v, bias = _xformers_inputs(q, k, v, bias)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


def xformers_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> dict:
    """Which operators xformers dispatches these inputs to, forward and backward, and whether its
    own compiled extension is loaded. xformers names an operator that calls PyTorch's kernel with
    a "-pt" suffix (e.g. "fa2F@2.7.4-pt", "cutlassF-pt"): when its extension fails to load, those
    are all that is left, and xformers is then PyTorch's flash / memory-efficient kernels."""
    import xformers
    from xformers.ops import fmha

    q, k, v, bias = _xformers_inputs(q, k, v, bias)
    inputs = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias)
    forward = fmha._dispatch_fw(inputs, True)  # as memory_efficient_attention picks them for training
    backward = fmha._dispatch_bw(inputs, varlen_lse_packed=forward.VARLEN_LSE_PACKED)
    return {"xformers": xformers.__version__, "extension_loaded": bool(getattr(xformers, "_has_cpp_library", False)),
            "forward": forward.NAME, "backward": backward.NAME}


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # a compiled block takes the answer as a constant: no graph break
def resolve_backend(device: torch.device) -> str:
    """What "auto" means on `device`: xformers if it imports and a small call runs there, else
    sdpa. Decided once per device and logged: with the reason when xformers is passed over, and
    with the kernels it dispatches to (with and without a bias) when it is taken."""
    if device.type != "cuda":
        log.info("attention backend: sdpa (device %s)", device)
        return "sdpa"
    try:
        q = torch.randn(1, 1, 8, 16, device=device, dtype=torch.float16)
        _xformers(q, q, q, None)
        plain = xformers_kernels(q, q, q)
        biased = xformers_kernels(q, q, q, torch.zeros(1, 1, 8, 8, device=device, dtype=q.dtype))
    except Exception as e:  # ImportError, a missing CUDA extension, an unsupported GPU...
        log.warning("attention backend: sdpa (xformers unavailable on %s: %s)", device, _why_not_xformers(e))
        return "sdpa"
    origin = ("its own CUDA extension" if plain["extension_loaded"]
              else "PyTorch's kernels: its own CUDA extension did not load")
    log.info("attention backend: xformers %s on %s via %s (forward %s, %s with a bias; backward %s, %s with a bias)",
             plain["xformers"], device, origin, plain["forward"], biased["forward"], plain["backward"],
             biased["backward"])
    return "xformers"


def _why_not_xformers(error: Exception) -> str:
    """One line on why xformers did not run. Its usual failure, a wheel built for another PyTorch,
    surfaces only as "No operator found", so name the build mismatch when that is the cause."""
    try:
        import xformers
        from xformers import _cpp_lib
    except ImportError:
        return str(error).splitlines()[0]
    load_error = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if load_error is None:
        return str(error).splitlines()[0]
    lines = [line.strip() for line in str(load_error).splitlines()]
    build = " ".join(line for line in lines[1:] if line and not line.startswith(("Please", "Memory", "Set ")))
    return f"xformers {xformers.__version__} cannot load its CUDA kernels: {lines[0]} {build}".strip()
