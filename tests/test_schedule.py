import math

import pytest
import torch

from dit_video.diffusion import CosineSchedule, alpha_sigma


def test_endpoints_are_the_truncation_range():
    s = CosineSchedule(logsnr_min=-15.0, logsnr_max=12.0)
    lam = s.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam[0].item() == pytest.approx(12.0, abs=1e-9)
    assert lam[1].item() == pytest.approx(-15.0, abs=1e-9)


def test_alpha_is_the_cosine_of_the_stretched_time():
    # sigmoid(-2 log tan u) = cos^2 u, so alpha(t) = cos(a t + b) with a, b from docs/math.md.
    s = CosineSchedule()
    b = math.atan(math.exp(-20 / 2))
    a = math.atan(math.exp(20 / 2)) - b
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, sigma = alpha_sigma(s.logsnr(t))
    torch.testing.assert_close(alpha, torch.cos(a * t + b), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, torch.sin(a * t + b), rtol=0, atol=1e-12)
    # Over [-20, 20] the truncation barely moves it from the plain cosine schedule cos(pi t / 2).
    torch.testing.assert_close(alpha, torch.cos(math.pi / 2 * t), rtol=0, atol=1e-4)


def test_logsnr_decreases_and_time_inverts_it():
    s = CosineSchedule()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = s.logsnr(t)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(s.time(lam), t, rtol=0, atol=1e-9)
    # float32 in, float32 out, still accurate
    assert s.logsnr(t.float()).dtype == torch.float32
    torch.testing.assert_close(s.time(s.logsnr(t.float())), t.float(), rtol=0, atol=1e-5)


def test_resolution_shift_adds_2_log_base_over_res():
    base, shifted = CosineSchedule(), CosineSchedule(base_resolution=64, resolution=256)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert shifted.shift == pytest.approx(2 * math.log(64 / 256))
    torch.testing.assert_close(shifted.logsnr(t) - base.logsnr(t), torch.full_like(t, 2 * math.log(0.25)))
    torch.testing.assert_close(shifted.time(shifted.logsnr(t)), t, rtol=0, atol=1e-9)


def test_grid_is_uniform_in_t_from_noise_to_data():
    s = CosineSchedule()
    g = s.grid(8)
    assert g.shape == (9,) and g.dtype == torch.float32
    assert g[0].item() == pytest.approx(-20, abs=1e-4) and g[-1].item() == pytest.approx(20, abs=1e-4)
    torch.testing.assert_close(s.time(g.double()), torch.linspace(1, 0, 9, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(logsnr_min=5.0, logsnr_max=5.0), "must be below"),
    (dict(logsnr_min=-math.inf), "finite"),
    (dict(base_resolution=64), "both"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CosineSchedule(**kwargs)


def test_a_grid_needs_a_step():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        CosineSchedule().grid(0)


def test_training_levels_are_uniform_in_t():
    s = CosineSchedule()
    lam = s.sample_logsnr(50_000, generator=torch.Generator().manual_seed(0))
    assert lam.shape == (50_000,) and lam.dtype == torch.float32
    assert lam.min() >= -20 and lam.max() <= 20
    t = s.time(lam.double())
    # uniform on [0, 1]: mean 1/2, variance 1/12, and the median level is logsnr(0.5) = 0
    assert t.mean().item() == pytest.approx(0.5, abs=0.005) and t.var().item() == pytest.approx(1 / 12, rel=0.02)
    assert lam.median().item() == pytest.approx(0.0, abs=0.05)
