"""The samplers against data whose exact denoiser is known: they must reproduce it."""

import math

import pytest
import torch

from dit_video.diffusion import (CosineSchedule, GaussianMixture, alpha_sigma, ancestral_step, ddim_step, diffuse,
                                 langevin_step, sample)

GAUSSIAN = GaussianMixture.gaussian([1.0, -2.0, 0.5], [[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
                          [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.1], [-0.1, 0.25]]])
SAMPLERS = {
    "ddim": dict(sampler="ddim"),
    "ancestral_gamma0": dict(sampler="ancestral", gamma=0.0),
    "ancestral_gamma1": dict(sampler="ancestral", gamma=1.0),
    "pc": dict(sampler="pc", corrector_steps=1, delta=0.1),
}
N = 20_000


def _draw(data: GaussianMixture, steps: int, **kwargs) -> torch.Tensor:
    z = torch.randn(N, data.dim, generator=torch.Generator().manual_seed(1))
    return sample(data.denoiser, z, steps=steps, generator=torch.Generator().manual_seed(2), **kwargs).double()


def _moment_errors(x: torch.Tensor, data: GaussianMixture) -> tuple[float, float]:
    """|mean error| and the covariance error relative to the covariance's norm."""
    cov = data.covariance
    return (x.mean(0) - data.mean).norm().item(), ((torch.cov(x.T) - cov).norm() / cov.norm()).item()


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_reproduces_a_gaussian_and_converges(name):
    errors = []
    for steps in (4, 16, 64):
        errors.append(_moment_errors(_draw(GAUSSIAN, steps, **SAMPLERS[name]), GAUSSIAN)[1])
    assert errors[0] > errors[1] > errors[2], errors
    mean_err, cov_err = _moment_errors(_draw(GAUSSIAN, 128, **SAMPLERS[name]), GAUSSIAN)
    # Monte Carlo standard errors at N = 20000: ~0.017 for the mean's norm, ~0.015 for the covariance.
    assert mean_err < 0.05 and cov_err < 0.06, (mean_err, cov_err)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_reproduces_mixture_weights_and_components(name):
    x = _draw(MIXTURE, 128, **SAMPLERS[name])
    component = MIXTURE.component_of(x)
    fractions = torch.bincount(component, minlength=3).double() / N
    # standard error of each fraction: sqrt(w (1 - w) / N) < 0.0036
    torch.testing.assert_close(fractions, MIXTURE.weights, rtol=0, atol=0.015)
    for k in range(3):
        members = x[component == k]
        assert (members.mean(0) - MIXTURE.means[k]).norm() < 0.05
        cov_err = (torch.cov(members.T) - MIXTURE.covs[k]).norm() / MIXTURE.covs[k].norm()
        assert cov_err < 0.12, (k, cov_err)


def test_ddim_is_a_first_order_solver_on_a_gaussian():
    # For Gaussian data DDIM is an affine map x = A z + c, so its output law is known exactly,
    # without Monte Carlo: covariance A A^T. The error must fall like 1/steps.
    z0 = torch.zeros(1, 3, dtype=torch.float64)
    basis = torch.eye(3, dtype=torch.float64)
    errors = []
    for steps in (16, 64, 256, 1024):
        run = lambda z: sample(GAUSSIAN.denoiser, z, steps=steps)  # noqa: E731
        c = run(z0)
        a = (run(basis) - c).T
        # The mean is right at any step count, up to the truncation: the sampler starts from N(0, I),
        # not from q(z_1) = N(alpha_1 mean, ...) with alpha_1 = 4.5e-5 at logsnr -20.
        torch.testing.assert_close(c[0], GAUSSIAN.mean, rtol=0, atol=2e-4)
        errors.append(((a @ a.T - GAUSSIAN.covariance).norm() / GAUSSIAN.covariance.norm()).item())
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert all(3.0 < r < 5.0 for r in ratios), (errors, ratios)
    assert errors[-1] < 4e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_variance_is_exact_in_the_limit(name):
    # 1D, many samples: the sample variance's standard error is 0.3% of the variance; the
    # remaining first-order discretization error at 1000 steps is below 1%.
    data = GaussianMixture.gaussian([0.5], [[0.7]])
    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(3))
    x = sample(data.denoiser, z, steps=1000, generator=torch.Generator().manual_seed(4), **SAMPLERS[name])
    assert x.double().var().item() == pytest.approx(0.7, rel=0.02)
    assert x.double().mean().item() == pytest.approx(0.5, abs=0.006)


def test_ddim_with_eta_one_is_the_ancestral_step():
    z, x_hat = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    lt, ls = torch.full((5,), -3.0, dtype=torch.float64), torch.full((5,), -1.0, dtype=torch.float64)
    noise = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(ddim_step(z, x_hat, lt, ls, eta=1.0, noise=noise),
                               ancestral_step(z, x_hat, lt, ls, gamma=0.0, noise=noise))
    # and so are the whole samplers, drawing the same noise in the same order
    z = torch.randn(64, 2, dtype=torch.float64)
    a = sample(MIXTURE.denoiser, z, sampler="ddim", eta=1.0, steps=10, generator=torch.Generator().manual_seed(0))
    b = sample(MIXTURE.denoiser, z, sampler="ancestral", steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_ddim_eta_zero_is_deterministic_and_exact_for_a_point_mass():
    # With data = a single point x0, eps_hat is exact and DDIM must land on x0 from any z.
    x0 = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    point = lambda z, logsnr: x0.expand_as(z)  # noqa: E731
    z = torch.randn(8, 3, dtype=torch.float64)
    lt, ls = torch.full((8,), -4.0, dtype=torch.float64), torch.full((8,), 6.0, dtype=torch.float64)
    z_s = ddim_step(z, point(z, lt), lt, ls)
    # the implied noise is preserved: (z_s - alpha_s x0) / sigma_s = (z - alpha_t x0) / sigma_t
    (a_t, s_t), (a_s, s_s) = alpha_sigma(lt[:1]), alpha_sigma(ls[:1])
    torch.testing.assert_close((z_s - a_s * x0) / s_s, (z - a_t * x0) / s_t)
    assert torch.equal(sample(point, z, steps=7), sample(point, z, steps=7, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_ancestral_step_noise_scale_interpolates_the_two_variances(gamma):
    lt, ls = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)
    z, x_hat = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    ones = torch.ones_like(z)
    std = ancestral_step(z, x_hat, lt, ls, gamma, noise=ones) - ancestral_step(z, x_hat, lt, ls, gamma, noise=0 * ones)
    (_, s_t), (_, s_s) = alpha_sigma(lt), alpha_sigma(ls)
    r = math.exp(-3.5)
    posterior_var, forward_var = (1 - r) * s_s**2, (1 - r) * s_t**2
    torch.testing.assert_close(std, (posterior_var ** (1 - gamma) * forward_var**gamma).sqrt().expand_as(z))


def test_ancestral_step_with_the_true_x_draws_from_the_marginal():
    # z_t ~ q(z_t | x), then z_s ~ q(z_s | z_t, x)  =>  z_s ~ q(z_s | x) = N(alpha_s x, sigma_s^2).
    n = 200_000
    x = torch.full((n, 1), 0.8, dtype=torch.float64)
    lt, ls = torch.full((n,), -1.0, dtype=torch.float64), torch.full((n,), 2.0, dtype=torch.float64)
    z_t = diffuse(x, lt, torch.randn_like(x))
    z_s = ancestral_step(z_t, x, lt, ls, gamma=0.0)
    a_s, s_s = (c[0].item() for c in alpha_sigma(ls))
    assert z_s.mean().item() == pytest.approx(a_s * 0.8, abs=0.005)
    assert z_s.var().item() == pytest.approx(s_s**2, rel=0.01)


def test_langevin_reaches_its_closed_form_stationary_law():
    # For a Gaussian marginal N(m, v) the corrector is the AR(1) chain z' = z - h/2 (z - m)/v + sqrt(h) xi
    # with h = delta sigma^2; its stationary variance is v / (1 - h / (4 v)) and mean m.
    data = GaussianMixture.gaussian([1.0], [[0.5]])
    lam = torch.full((100_000,), -0.5, dtype=torch.float64)
    alpha, sigma = (c[0].item() for c in alpha_sigma(lam))
    m, v, delta = alpha * 1.0, alpha**2 * 0.5 + sigma**2, 0.5
    h = delta * sigma**2
    z = torch.randn(100_000, 1, dtype=torch.float64)
    for _ in range(150):
        z = langevin_step(data.denoiser, z, lam, delta=delta)
    assert z.mean().item() == pytest.approx(m, abs=0.01)
    assert z.var().item() == pytest.approx(v / (1 - h / (4 * v)), rel=0.015)


def test_call_counts_and_what_the_denoiser_sees():
    calls = []

    def spy(z, logsnr):
        calls.append((z.dtype, z.shape, logsnr.dtype, logsnr.shape))
        return torch.zeros_like(z)

    z = torch.randn(3, 4, 2, 5, 5)  # video-shaped
    sample(spy, z, sampler="ddim", steps=6)
    assert len(calls) == 6 and all(c == (torch.float32, z.shape, torch.float32, (3,)) for c in calls)
    calls.clear()
    sample(spy, z, sampler="pc", steps=6, corrector_steps=2)
    assert len(calls) == 6 + 5 * 2


def test_pc_without_corrector_steps_is_ancestral():
    z = torch.randn(50, 2)
    a = sample(MIXTURE.denoiser, z, sampler="pc", corrector_steps=0, steps=12, generator=torch.Generator().manual_seed(5))
    b = sample(MIXTURE.denoiser, z, sampler="ancestral", steps=12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_stochastic_samplers_follow_their_generator():
    z = torch.randn(16, 2)
    run = lambda seed: sample(MIXTURE.denoiser, z, sampler="pc", steps=8,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_one_step_returns_the_denoiser_at_pure_noise():
    # At logsnr -20, E[x | z] is the data mean whatever z is.
    z = torch.randn(10, 2)
    x = sample(MIXTURE.denoiser, z, steps=1, progress=True)
    torch.testing.assert_close(x.double(), MIXTURE.mean.expand(10, 2), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SAMPLERS)
def test_dtypes_are_kept_and_results_finite(dtype, name):
    z = torch.randn(256, 2)
    x = sample(MIXTURE.denoiser, z.to(dtype), steps=16, generator=torch.Generator().manual_seed(0), **SAMPLERS[name])
    assert x.dtype == dtype and torch.isfinite(x).all()
    ref = sample(MIXTURE.denoiser, z, steps=16, generator=torch.Generator().manual_seed(0), **SAMPLERS[name])
    # low precision only rounds the denoiser's input; the trajectory itself is integrated in float32
    tol = {torch.float64: 1e-5, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    assert (x.float() - ref).abs().median() < tol


@pytest.mark.parametrize("lt, ls", [(-20.0, 20.0), (-20.0, -19.99), (19.99, 20.0)])
def test_single_steps_at_the_ends_of_the_range_stay_finite(lt, ls):
    z, x_hat = torch.randn(4, 3), torch.randn(4, 3)
    lt, ls = torch.full((4,), lt), torch.full((4,), ls)
    for out in (ddim_step(z, x_hat, lt, ls), ddim_step(z, x_hat, lt, ls, eta=0.5),
                ancestral_step(z, x_hat, lt, ls, gamma=0.5), langevin_step(MIXTURE.denoiser, z[:, :2], ls)):
        assert torch.isfinite(out).all()


def test_shifted_schedule_is_used_by_the_sampler():
    levels = []
    sample(lambda z, l: levels.append(l[0].item()) or torch.zeros_like(z), torch.randn(2, 2), steps=4,
           schedule=CosineSchedule(base_resolution=32, resolution=128))
    expected = CosineSchedule(base_resolution=32, resolution=128).grid(4)[:4]
    assert levels == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(eta=1.5), "eta must be in"),
    (dict(sampler="ancestral", eta=0.5), "eta does not apply to the 'ancestral' sampler"),
    (dict(sampler="ddim", gamma=0.5), "gamma does not apply"),
    (dict(sampler="ancestral", corrector_steps=3), "corrector_steps does not apply"),
    (dict(sampler="pc", delta=0.0), "delta > 0"),
])
def test_bad_sampler_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(MIXTURE.denoiser, torch.randn(2, 2), **kwargs)


def test_non_finite_noise_is_refused():
    z = torch.randn(2, 2)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample(MIXTURE.denoiser, z)
