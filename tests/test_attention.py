"""One attention function, three backends: sdpa agrees with the math reference (xformers is
compared on a GPU by tests/test_cuda.py)."""

import logging

import pytest
import torch

from dit_video.models import attention, resolve_backend


def _qkv(b=2, h=3, lq=7, lk=5, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 7, 5), (2, 1, 7, 5), (2, 3, 7, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_the_math_reference(bias_shape, masked):
    q, k, v = _qkv()
    bias = None if bias_shape is None else torch.randn(bias_shape)
    key_mask = torch.tensor([[True, True, False, True, False], [True] * 5]) if masked else None
    ref = attention(q, k, v, bias, key_mask, backend="math")
    torch.testing.assert_close(attention(q, k, v, bias, key_mask, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    # so do the gradients of q, k, v and the bias (a learned relative position bias trains)
    grads = []
    for backend in ("math", "sdpa"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, bias) if t is not None]
        out = attention(*inputs[:3], inputs[3] if bias is not None else None, key_mask, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for ours, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_the_reference_is_softmax_attention():
    q, k, v = _qkv(b=1, h=1, lq=1, lk=3, d=2, dtype=torch.float64)
    scores = (q[0, 0] @ k[0, 0].T) / 2**0.5
    expected = scores.softmax(-1) @ v[0, 0]
    torch.testing.assert_close(attention(q, k, v, backend="math")[0, 0], expected)
    # a key mask leaving one key makes the output that key's value
    only = torch.tensor([[False, True, False]])
    torch.testing.assert_close(attention(q, k, v, key_mask=only, backend="math")[0, 0, 0], v[0, 0, 1])


def test_a_large_bias_selects_keys_like_a_mask():
    q, k, v = _qkv()
    bias = torch.zeros(1, 1, 7, 5)
    bias[..., 2:] = -1e4
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    torch.testing.assert_close(attention(q, k, v, bias=bias), attention(q, k, v, key_mask=mask), rtol=1e-5, atol=1e-6)


def test_auto_is_sdpa_on_cpu_and_says_so_once(caplog):
    resolve_backend.cache_clear()
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="dit_video.models.attention"):
        out = attention(q, k, v)
        attention(q, k, v)
    assert [r.getMessage() for r in caplog.records] == ["attention backend: sdpa (device cpu)"]
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))


def test_bad_calls_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="need q"):
        attention(q, k[:, :, :, :8], v)
    with pytest.raises(ValueError, match="key_mask must be a bool"):
        attention(q, k, v, key_mask=torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="CUDA only"):
        attention(q, k, v, backend="xformers")


def test_why_xformers_was_passed_over_is_one_line(monkeypatch):
    """`auto` logs why xformers did not run: its usual failure, a wheel built for another PyTorch,
    surfaces only as "No operator found", so the cause is read from its extension's load error."""
    xformers_cpp = pytest.importorskip("xformers._cpp_lib")
    from dit_video.models.attention import _why_not_xformers

    symptom = RuntimeError("No operator found for `memory_efficient_attention_forward` with inputs:\n  query: ...")
    monkeypatch.setattr(xformers_cpp, "_cpp_library_load_exception", None, raising=False)
    assert _why_not_xformers(symptom) == "No operator found for `memory_efficient_attention_forward` with inputs:"
    load_error = ("xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
                  "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.14.1+cu130)\n"
                  "    Python  3.10.19 (you have 3.11.7)\n"
                  "  Please reinstall xformers (see https://github.com/facebookresearch/xformers#installing-xformers)\n"
                  "  Set XFORMERS_MORE_DETAILS=1 for more details")
    monkeypatch.setattr(xformers_cpp, "_cpp_library_load_exception", RuntimeError(load_error), raising=False)
    reason = _why_not_xformers(symptom)
    assert "\n" not in reason and reason.startswith("xformers ") and "cannot load its CUDA kernels" in reason
    assert "PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.14.1+cu130)" in reason and "Please" not in reason
