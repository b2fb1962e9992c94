"""The same math on a CUDA device (skipped where there is none): devices and dtypes are kept,
and with a CPU generator a CUDA run draws the same noise, so it matches the CPU run."""

import pytest
import torch

from dit_video.diffusion import (GaussianMixture, alpha_sigma, classifier_free_guidance, diffusion_loss,
                                 dynamic_thresholding, sample)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SAMPLERS = [dict(sampler="ddim"), dict(sampler="ddim", eta=0.7), dict(sampler="ancestral", gamma=0.5),
            dict(sampler="pc", corrector_steps=2)]


def gaussian_denoiser(mean: float, var: float):
    """E[x | z] for x ~ N(mean, var I), elementwise, on z's device."""

    def denoise(z, logsnr):
        a, s = (c.view(-1, *[1] * (z.ndim - 1)) for c in alpha_sigma(logsnr))
        return (mean + a * var * (z - a * mean) / (a**2 * var + s**2)).to(z.dtype)

    return denoise


@pytest.mark.parametrize("kwargs", SAMPLERS)
def test_cuda_sample_matches_cpu_with_a_cpu_generator(kwargs):
    z = torch.randn(8, 4, 5, 6, 6)
    d = gaussian_denoiser(0.3, 0.5)
    cpu = sample(d, z, steps=20, generator=torch.Generator().manual_seed(0), **kwargs)
    gpu = sample(d, z.cuda(), steps=20, generator=torch.Generator().manual_seed(0), **kwargs)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", SAMPLERS)
def test_cuda_generator_and_bfloat16(kwargs):
    z = torch.randn(64, 3, device="cuda").bfloat16()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = sample(gaussian_denoiser(1.0, 0.25), z, steps=64, generator=gen, **kwargs)
    assert x.dtype == torch.bfloat16 and x.device.type == "cuda" and torch.isfinite(x).all()
    assert x.float().mean().item() == pytest.approx(1.0, abs=0.1)


def test_guidance_wrappers_on_cuda_in_bfloat16():
    def model(z, logsnr, label):
        return label.view(-1, 1, 1) * z

    z = 4 * torch.randn(4, 8, 16)
    cond, uncond = {"label": torch.ones(4)}, {"label": torch.zeros(4)}
    ref = dynamic_thresholding(classifier_free_guidance(model, 2.0, cond, uncond, rescale=0.5), 0.99)(z, torch.zeros(4))
    cond_g = {"label": torch.ones(4, device="cuda", dtype=torch.bfloat16)}
    uncond_g = {"label": torch.zeros(4, device="cuda", dtype=torch.bfloat16)}
    guided = dynamic_thresholding(classifier_free_guidance(model, 2.0, cond_g, uncond_g, rescale=0.5), 0.99)
    out = guided(z.cuda().bfloat16(), torch.zeros(4, device="cuda"))
    assert out.device.type == "cuda" and out.abs().max() <= 1.0
    torch.testing.assert_close(out.float().cpu(), ref, rtol=0, atol=0.05)


def test_loss_and_exact_denoiser_keep_the_device():
    x = torch.randn(4, 3, 2, 8, 8, device="cuda")
    loss = diffusion_loss(torch.randn_like(x).bfloat16(), x, torch.randn_like(x), torch.linspace(-20, 20, 4, device="cuda"),
                          prediction="v", weighting="min_snr")
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    data = GaussianMixture.gaussian([0.0, 1.0], [[1.0, 0.0], [0.0, 2.0]])
    out = data.denoiser(torch.randn(5, 2, device="cuda"), torch.zeros(5, device="cuda"))
    assert out.device.type == "cuda"


@pytest.mark.parametrize("with_bias", [False, True])
def test_xformers_attention_matches_sdpa(with_bias):
    from dit_video.models import attention, resolve_backend

    if resolve_backend(torch.device("cuda")) != "xformers":
        pytest.skip("xformers does not run on this CUDA setup (auto falls back to sdpa)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for n in (33, 17, 17))
    bias = torch.randn(1, 4, 33, 17, device="cuda", generator=g).bfloat16() if with_bias else None
    mask = torch.ones(2, 17, dtype=torch.bool, device="cuda")
    mask[0, 9:] = False
    ref = attention(q, k, v, bias, mask, backend="sdpa").float()
    torch.testing.assert_close(attention(q, k, v, bias, mask, backend="xformers").float(), ref, rtol=0, atol=2e-2)


def test_xformers_reports_the_kernels_that_run():
    """The operators xformers says it dispatches to are the kernels the profiler sees; without its
    own extension they are PyTorch's ("-pt")."""
    from torch.profiler import ProfilerActivity, profile

    from dit_video.models import attention, resolve_backend, xformers_kernels

    if resolve_backend(torch.device("cuda")) != "xformers":
        pytest.skip("xformers does not run on this CUDA setup (auto falls back to sdpa)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 8, 64, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    for bias in (None, torch.randn(1, 8, 64, 64, device="cuda", generator=g).bfloat16()):
        ops = xformers_kernels(q, k, v, bias)
        if not ops["extension_loaded"]:
            assert ops["forward"].endswith("-pt") and ops["backward"].endswith("-pt")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attention(*leaves, bias, backend="xformers").sum().backward()
            torch.cuda.synchronize()
        kernels = " ".join(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA).lower()
        family = "flash" if ops["forward"].startswith("fa") else "fmha"  # cutlass: PyTorch's fmha_cutlass kernels
        assert family in kernels, (ops, kernels[:500])


@pytest.mark.parametrize("text_attention", ["cross", "joint"])
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_dit_in_bfloat16_on_cuda_matches_the_float32_math_reference(name, backend, text_attention):
    from backbone_checks import make_dit

    from dit_video.models import resolve_backend

    if backend == "xformers" and resolve_backend(torch.device("cuda")) != "xformers":
        pytest.skip("xformers does not run on this CUDA setup (auto falls back to sdpa)")
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 5, 8, 12, generator=g), torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    inputs = dict(logsnr=torch.tensor([0.5, -3.0]), text=text, text_mask=mask)
    outputs = []
    reference = make_dit(name, "rope", "t5_bias", text_attention=text_attention)
    tested = make_dit(name, "rope", "t5_bias", attention_backend=backend, text_attention=text_attention)
    for model, device, dtype in ((reference, "cpu", torch.float32), (tested, "cuda", torch.bfloat16)):
        model = model.to(device=device, dtype=dtype).train()
        out = model(z.to(device, dtype), **{k: v.to(device) if v.dtype == torch.bool else v.to(device, dtype)
                                            for k, v in inputs.items()})
        out.float().square().mean().backward()
        grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
        outputs.append((out.detach().float().cpu(), grads))
    (ref, ref_grads), (out, grads) = outputs
    assert (out - ref).norm() / ref.norm() < 2e-2
    assert (grads - ref_grads).norm() / ref_grads.norm() < 5e-2
