import pytest
import torch

from dit_video.diffusion import (CosineSchedule, GaussianMixture, GuidanceConfig, OscillatingWeight,
                                 classifier_free_guidance, convert, dynamic_threshold, dynamic_thresholding,
                                 guidance_rescale, guided_denoiser, sample)


class Conditional:
    """A conditional denoiser x_hat = label * z + shift that counts its calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, z, logsnr, label, shift=None):
        self.batches.append(z.shape[0])
        out = label.view(-1, *[1] * (z.ndim - 1)) * z
        return out if shift is None else out + shift.view(-1, *[1] * (z.ndim - 1))


def test_cfg_is_one_plus_w_cond_minus_w_uncond_in_one_batched_call():
    model = Conditional()
    z, lam = torch.randn(4, 3, 5), torch.zeros(4)
    cond, uncond = {"label": torch.full((4,), 2.0)}, {"label": torch.full((4,), 0.5)}
    x = classifier_free_guidance(model, 3.0, cond, uncond)(z, lam)
    torch.testing.assert_close(x, (1 + 3.0) * 2.0 * z - 3.0 * 0.5 * z)
    assert model.batches == [8]


def test_zero_weight_is_exactly_the_conditional_denoiser():
    model = Conditional()
    z, lam = torch.randn(4, 3), torch.zeros(4)
    cond, uncond = {"label": torch.full((4,), 2.0)}, {"label": torch.zeros(4)}
    assert torch.equal(classifier_free_guidance(model, 0.0, cond, uncond)(z, lam), 2.0 * z)
    assert model.batches == [4]  # the unconditional half is skipped, not multiplied by zero


def test_per_sample_weights_and_none_arguments():
    model = Conditional()
    z, lam = torch.randn(3, 2), torch.zeros(3)
    w = torch.tensor([0.0, 1.0, 4.0])
    cond = {"label": torch.ones(3), "shift": None}
    uncond = {"label": torch.zeros(3), "shift": None}
    x = classifier_free_guidance(model, w, cond, uncond)(z, lam)
    torch.testing.assert_close(x, (1 + w)[:, None] * z)


def test_guidance_is_the_same_in_eps_and_v_space():
    model = Conditional()
    z, lam = torch.randn(4, 6, dtype=torch.float64), torch.linspace(-5, 5, 4, dtype=torch.float64)
    cond, uncond = {"label": torch.full((4,), 0.9, dtype=torch.float64)}, {"label": torch.full((4,), 0.2, dtype=torch.float64)}
    w = 2.5
    x = classifier_free_guidance(model, w, cond, uncond)(z, lam)
    for space in ("eps", "v"):
        c = convert(model(z, lam, **cond), z, lam, "x", space)
        u = convert(model(z, lam, **uncond), z, lam, "x", space)
        torch.testing.assert_close(convert(x, z, lam, "x", space), (1 + w) * c - w * u)


def test_guidance_sharpens_a_class_of_a_mixture():
    # Two well separated classes; the conditional model knows the class, the unconditional does not.
    # Guidance pushes samples of class 0 away from class 1: at w = 0 we get exactly the class-0
    # distribution, and growing w moves its samples further from the class-1 centre.
    data = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [[[0.3, 0.0], [0.0, 0.3]]] * 2)
    class0 = data.restrict([0])

    def model(z, logsnr, label):
        pick = label.view(-1, 1).bool()
        return torch.where(pick, data.denoiser(z, logsnr), class0.denoiser(z, logsnr))

    cond, uncond = {"label": torch.zeros(4000)}, {"label": torch.ones(4000)}
    z = torch.randn(4000, 2)
    means = []
    for w in (0.0, 1.0, 3.0):
        x = sample(classifier_free_guidance(model, w, cond, uncond), z, steps=64).double()
        means.append(x[:, 0].mean().item())
        if w == 0:
            assert x[:, 0].mean().item() == pytest.approx(-1.0, abs=0.04)
            assert x[:, 0].var().item() == pytest.approx(0.3, rel=0.1)
    assert means[0] > means[1] > means[2]


def test_guidance_rescale_matches_the_conditional_std():
    x_c = torch.randn(3, 4, 8)
    x_g = 3.0 * x_c + 0.5 * torch.randn(3, 4, 8)
    r = guidance_rescale(x_g, x_c)
    torch.testing.assert_close(r.flatten(1).std(1), x_c.flatten(1).std(1))
    model = Conditional()
    z, lam = torch.randn(2, 16), torch.zeros(2)
    cond, uncond = {"label": torch.ones(2)}, {"label": -torch.ones(2)}
    plain = classifier_free_guidance(model, 2.0, cond, uncond)(z, lam)
    full = classifier_free_guidance(model, 2.0, cond, uncond, rescale=1.0)(z, lam)
    half = classifier_free_guidance(model, 2.0, cond, uncond, rescale=0.5)(z, lam)
    torch.testing.assert_close(full.std(1), z.std(1))  # x_c = z here
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_oscillating_weight_follows_the_steps():
    steps, schedule = 10, CosineSchedule()
    weight = OscillatingWeight(high=7.0, low=1.0, steps=steps, high_fraction=0.3, schedule=schedule)
    seen = [weight(level.view(1)).item() for level in schedule.grid(steps)[:steps]]
    assert seen == [7, 7, 7] + [7, 1, 7, 1, 7, 1, 7]
    # inside a sampler: the guided denoiser sees the same sequence
    model, used = Conditional(), []

    def spy(logsnr):
        w = weight(logsnr)
        used.append(w[0].item())
        return w

    cond, uncond = {"label": torch.ones(2)}, {"label": torch.zeros(2)}
    sample(classifier_free_guidance(model, spy, cond, uncond), torch.randn(2, 3), steps=steps, schedule=schedule)
    assert used == seen


def test_dynamic_threshold_bounds_and_identity():
    x = torch.stack([torch.linspace(-4, 4, 1001), torch.linspace(-0.5, 0.5, 1001)])
    y = dynamic_threshold(x, percentile=0.9)
    assert y.abs().max() <= 1.0
    # sample 0: s = 90th percentile of |x| = 3.6: clip to [-3.6, 3.6] and divide
    torch.testing.assert_close(y[0], x[0].clamp(-3.6, 3.6) / 3.6, rtol=0, atol=2e-3)
    assert torch.equal(y[1], x[1])  # |x| <= 1 already: s = 1, untouched
    wrapped = dynamic_thresholding(lambda z, l: 10 * z, 0.995)
    assert wrapped(torch.randn(2, 3, 4, 4), torch.zeros(2)).abs().max() <= 1.0


def test_guided_denoiser_composes_what_the_config_asks():
    model = Conditional()
    cond, uncond = {"label": torch.ones(2)}, {"label": torch.zeros(2)}
    z, lam = 3 * torch.randn(2, 50), torch.zeros(2)
    cfg = GuidanceConfig(weight=2.0, rescale=0.0, threshold_percentile=0.99)
    x = guided_denoiser(model, cond, uncond, cfg, steps=10)(z, lam)
    torch.testing.assert_close(x, dynamic_threshold(3.0 * z, 0.99))
    # oscillating: at the last step of 4 with high_fraction 0.5 the weight is low
    cfg = GuidanceConfig(weight=5.0, weight_low=1.0, high_fraction=0.5)
    last = CosineSchedule().grid(4)[3].repeat(2)
    torch.testing.assert_close(guided_denoiser(model, cond, uncond, cfg, steps=4)(z, last), 2.0 * z)


def test_mismatched_conditioning_is_refused():
    model = Conditional()
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(model, 1.0, {"label": torch.ones(2)}, {"text": torch.ones(2)})
    with pytest.raises(ValueError, match="one shape"):
        classifier_free_guidance(model, 1.0, {"label": torch.ones(2, 3)}, {"label": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="rescale"):
        classifier_free_guidance(model, 1.0, {}, {}, rescale=2.0)
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(torch.ones(1, 2), 0.0)
