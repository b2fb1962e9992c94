"""Reconstruction guidance against Gaussian data, where every conditional is known in closed form.

For x ~ N(m, S) at level l (SNR = e^l), Tweedie gives d x_hat / d z = (alpha / sigma^2) C with
C = Cov[x | z_t] = (S^-1 + SNR I)^-1, so the guided x_b is x_b_hat + w SNR C_ba (x_a - x_a_hat),
and the exact E[x_b | z_t, x_a] is x_b_hat + C_ba C_aa^-1 (x_a - x_a_hat). The two agree when
C_aa = I / (w SNR): for a precision [[p I, q U], [q U^T, r I]] (U orthogonal) C_aa is isotropic
at every level, with C_aa^-1 = (p + SNR - q^2 / (r + SNR)) I, so the weight
w*(l) = 1 + (p - q^2 / (r + SNR)) / SNR makes the guidance exact; it is >= 1 and tends to 1 as
the noise vanishes.
"""

import math

import pytest
import torch

from dit_video.diffusion import (GaussianMixture, alpha_sigma, observation_guidance, reconstruction_guidance,
                                 sample)

SAMPLERS = ("ddim", "ancestral", "pc")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with a busy CPU, intra-op threads only contend (measured 18x slower
    with 2 threads beside a training job), so this module runs on one and restores the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_gaussian(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim + 0.3 * torch.eye(dim, dtype=torch.float64)


# The structured case: x = [x_a (2), x_b (2)], precision [[p I, q U], [q U^T, r I]], U a rotation.
# Each x_b coordinate is coupled to both x_a ones; Corr^2 between the parts is q^2 / (p r) = 0.81.
P, Q, R = 1.0, -0.9, 1.0
_U = torch.tensor([[math.cos(0.6), -math.sin(0.6)], [math.sin(0.6), math.cos(0.6)]], dtype=torch.float64)
_PRECISION = torch.cat([torch.cat([P * torch.eye(2, dtype=torch.float64), Q * _U], 1),
                        torch.cat([Q * _U.T, R * torch.eye(2, dtype=torch.float64)], 1)])
COV = torch.linalg.inv(_PRECISION)
MEAN = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=torch.float64)
DATA = GaussianMixture.gaussian(MEAN, COV)
X_A = torch.tensor([1.5, 1.0], dtype=torch.float64)
KNOWN = torch.cat([X_A, torch.zeros(2, dtype=torch.float64)])[None]
MASK = torch.tensor([[True, True, False, False]])
# p(x_b | x_a) = N(COND_MEAN, COND_COV), its exact denoiser E[x_b | z_b] is COND.denoiser.
COND_MEAN = MEAN[2:] + COV[2:, :2] @ torch.linalg.solve(COV[:2, :2], X_A - MEAN[:2])
COND_COV = COV[2:, 2:] - COV[2:, :2] @ torch.linalg.solve(COV[:2, :2], COV[:2, 2:])
COND = GaussianMixture.gaussian(COND_MEAN, COND_COV)


def ideal_weight(logsnr: torch.Tensor) -> torch.Tensor:
    """w*(l) = C_aa^-1 / SNR for the structured Gaussian: the weight at which guidance is exact."""
    snr = logsnr.double().exp()
    return 1 + (P - Q**2 / (R + snr)) / snr


def _replaced(z, known, mask, logsnr, seed):
    """The z the wrapper hands to the denoiser: z_a drawn from q(z_a | x_a) with the noise of `seed`."""
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).double()
    alpha, sigma = (c[:, None] for c in alpha_sigma(logsnr))
    return torch.where(mask, alpha * known + sigma * eps, z)


def test_guided_correction_is_the_tweedie_closed_form():
    # A generic correlated Gaussian in 5 dims, x_a = entries {0, 3}; per-sample levels and weights.
    mean, cov = _random_gaussian(5, seed=0)
    data = GaussianMixture.gaussian(mean, cov)
    mask = torch.tensor([[True, False, False, True, False]])
    a, b = mask[0], ~mask[0]
    known = torch.where(mask, torch.randn(1, 5, dtype=torch.float64), float("nan"))  # ignored entries may be NaN
    z = torch.randn(6, 5, dtype=torch.float64)
    logsnr = torch.tensor([-6.0, -2.0, 0.0, 1.5, 4.0, 8.0], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.0, 0.0], dtype=torch.float64)

    # One batched call, the error summed over the batch; each row must match its own closed form.
    out = reconstruction_guidance(data.denoiser, known, mask, w, generator=torch.Generator().manual_seed(7))(z, logsnr)
    z_r = _replaced(z, known, mask, logsnr, seed=7)
    x_hat = data.denoiser(z_r, logsnr)
    for i, level in enumerate(logsnr):
        snr = level.exp()
        c = torch.linalg.inv(torch.linalg.inv(cov) + snr * torch.eye(5, dtype=torch.float64))  # Cov[x | z_t]
        expected_b = x_hat[i, b] + w[i] * snr * c[b][:, a] @ (known[0, a] - x_hat[i, a])
        torch.testing.assert_close(out[i, b], expected_b, rtol=0, atol=1e-10)
    assert torch.equal(out[:, a], known[:, a].expand(6, -1))

    # Replacement is x_hat at the same replaced z; weight 0 (the last row) reduces guided to it.
    rep = reconstruction_guidance(data.denoiser, known, mask, method="replacement",
                                  generator=torch.Generator().manual_seed(7))(z, logsnr)
    torch.testing.assert_close(rep[:, b], x_hat[:, b], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[5], rep[5], rtol=0, atol=1e-12)


def test_guidance_is_exact_at_the_ideal_weight_and_a_scaled_correction_otherwise():
    z = torch.randn(7, 4, dtype=torch.float64)
    logsnr = torch.tensor([-8.0, -4.0, -1.0, 0.0, 2.0, 6.0, 12.0], dtype=torch.float64)
    exact_b = COND.denoiser(z[:, 2:], logsnr)  # E[x_b | z_b, x_a]: z_a adds nothing once x_a is known
    w_star = ideal_weight(logsnr)

    guided = reconstruction_guidance(DATA.denoiser, KNOWN, MASK, ideal_weight)(z, logsnr)
    torch.testing.assert_close(guided[:, 2:], exact_b, rtol=0, atol=1e-10)  # whatever z_a was drawn

    # A constant weight w gives the exact correction scaled by w / w*(l): too weak at high noise
    # (w* = 568 at l = -8), right as the noise vanishes (w* - 1 = 6e-6 at l = 12).
    seed = 3
    x_hat_b = DATA.denoiser(_replaced(z, KNOWN, MASK, logsnr, seed), logsnr)[:, 2:]
    for w in (1.0, 2.0):
        out = reconstruction_guidance(DATA.denoiser, KNOWN, MASK, w, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out(z, logsnr)[:, 2:] - x_hat_b, (w / w_star)[:, None] * (exact_b - x_hat_b),
                                   rtol=0, atol=1e-10)
    assert (w_star >= 1).all() and (w_star.diff() < 0).all() and w_star[-1] - 1 < 1e-5 and w_star[0] > 500


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_at_the_ideal_weight_follows_the_exact_conditional_path_by_path(sampler):
    # At w*(l) the guided denoiser IS E[x_b | z_b, x_a], so with the same sampler noise every x_b
    # trajectory equals that of sampling p(x_b | x_a) with its exact denoiser (float64: to rounding).
    def exact(z, logsnr):
        return torch.cat([X_A.expand(len(z), 2), COND.denoiser(z[:, 2:], logsnr)], 1)

    z = torch.randn(64, 4, dtype=torch.float64)
    guided = reconstruction_guidance(DATA.denoiser, KNOWN, MASK, ideal_weight,
                                     generator=torch.Generator().manual_seed(5))
    x = sample(guided, z, sampler=sampler, steps=16, generator=torch.Generator().manual_seed(2))
    x_exact = sample(exact, z, sampler=sampler, steps=16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, x_exact, rtol=0, atol=1e-9)


def _moment_errors(x_b: torch.Tensor) -> tuple[float, float]:
    """|mean error| and the covariance error relative to the norm of the exact conditional's."""
    return ((x_b.mean(0) - COND_MEAN).norm().item(),
            ((torch.cov(x_b.T) - COND_COV).norm() / COND_COV.norm()).item())


# Measured moment errors (|mean err|, rel. cov err) of x_b against p(x_b | x_a), 64 steps, 2000 draws
# (Monte Carlo standard errors ~0.03 and ~0.04); at 20000 draws in brackets:
#   sampler     replacement     guided w=2                   guided w*(l)
#   ddim        0.82  1.17      0.37  0.16  [0.39 0.17]      0.03  0.08  [0.014 0.04]
#   ancestral   0.52  0.60      0.10  0.09  [0.10 0.11]      0.007 0.05  [0.011 0.07]
#   pc          0.37  0.43      0.03  0.12  [0.02 0.12]      0.03  0.05  [0.006 0.05]
# (what w*(l) leaves is the samplers' own 64-step error: ancestral's 0.07 is 0.013 at 256 steps.)
# The conditional is tight (variance 1 against a prior variance of 5.3, mean (2.51, 0.61) against
# the prior's (1, 0)). Replacement sees x_a only through its noisy copy: its x_b mean stops short
# ((1.76, 0.26) with DDIM) and its variance is 1.4-2.3. A constant w = 2 removes most of that bias;
# it cannot be exact at every level (w* runs from ~1e8 down to 1), the best constant differs per
# sampler (DDIM, which never forgets an early error, wants a larger one) and too large a weight
# over-corrects: w = 10 overshoots the mean (2.8-2.9) and shrinks the variance to 0.1-0.4.
GUIDED_BOUNDS = {"ddim": (0.45, 0.25), "ancestral": (0.16, 0.18), "pc": (0.1, 0.2)}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guided_sampling_recovers_the_conditional_and_replacement_does_not(sampler):
    n, steps = 2000, 64
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))

    def draw(method, weight):
        den = reconstruction_guidance(DATA.denoiser, KNOWN.float(), MASK, weight, method=method,
                                      generator=torch.Generator().manual_seed(3))
        x = sample(den, z, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(2))
        assert torch.equal(x[:, :2], KNOWN[:, :2].float().expand(n, -1))
        return _moment_errors(x[:, 2:].double())

    replacement, guided, ideal = draw("replacement", 0.0), draw("guided", 2.0), draw("guided", ideal_weight)
    assert ideal[0] < 0.1 and ideal[1] < 0.15, ideal
    assert guided[0] < GUIDED_BOUNDS[sampler][0] and guided[1] < GUIDED_BOUNDS[sampler][1], guided
    assert replacement[0] > 0.3 and replacement[1] > 0.35, replacement  # the known bias of replacement
    assert guided[0] < 0.5 * replacement[0] and guided[1] < 0.4 * replacement[1], (guided, replacement)


def test_observation_guidance_is_the_tweedie_closed_form():
    # A linear observation (pairwise averages, a 2x "downsample" of 6 entries): x_tilde =
    # x_hat + w SNR C A^T (y - A x_hat) for all entries; nothing is replaced.
    mean, cov = _random_gaussian(6, seed=1)
    data = GaussianMixture.gaussian(mean, cov)
    a = torch.kron(torch.eye(3, dtype=torch.float64), torch.full((1, 2), 0.5, dtype=torch.float64))
    y = torch.randn(1, 3, dtype=torch.float64)
    z = torch.randn(5, 6, dtype=torch.float64)
    logsnr = torch.linspace(-5, 7, 5, dtype=torch.float64)
    w = 1.5
    out = observation_guidance(data.denoiser, y, lambda x: x @ a.T, w)(z, logsnr)
    x_hat = data.denoiser(z, logsnr)
    for i, level in enumerate(logsnr):
        snr = level.exp()
        c = torch.linalg.inv(torch.linalg.inv(cov) + snr * torch.eye(6, dtype=torch.float64))
        torch.testing.assert_close(out[i], x_hat[i] + w * snr * c @ a.T @ (y[0] - a @ x_hat[i]), rtol=0, atol=1e-10)
    assert torch.equal(observation_guidance(data.denoiser, y, lambda x: x @ a.T, 0.0)(z, logsnr), x_hat)


def test_observation_guidance_samples_a_temporal_super_resolution():
    # Four "frames" whose pairwise averages y = A x are observed (VDM's x_a_hat = downsample(x_hat)).
    # A = U_a^T / sqrt(2) with U_a an orthonormal basis; in the basis [U_a, U_b] the data has the
    # structured precision above, so A C A^T = I / (2 w*(l) SNR) and the weight 2 w*(l) is exact:
    # the sampler then draws from p(x | A x = y) itself, a Gaussian singular along A.
    u = torch.tensor([[1, 0, 1, 0], [1, 0, -1, 0], [0, 1, 0, 1], [0, 1, 0, -1]], dtype=torch.float64) / math.sqrt(2)
    cov = u @ COV @ u.T
    mean = u @ MEAN
    a = u[:, :2].T / math.sqrt(2)  # rows (1, 1, 0, 0) / 2 and (0, 0, 1, 1) / 2
    y = torch.tensor([0.8, -0.4], dtype=torch.float64)
    gain = cov @ a.T @ torch.linalg.inv(a @ cov @ a.T)
    cond_mean, cond_cov = mean + gain @ (y - a @ mean), cov - gain @ a @ cov
    data = GaussianMixture.gaussian(mean, cov)

    n = 2000
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    den = observation_guidance(data.denoiser, y[None].float(), lambda x: x @ a.T.to(x.dtype),
                               lambda logsnr: 2 * ideal_weight(logsnr))
    x = sample(den, z, sampler="pc", steps=64, generator=torch.Generator().manual_seed(2)).double()
    # Measured: |mean err| 0.034, rel. cov err 0.035 (Monte Carlo ~0.03 and ~0.04), max |A x - y| 1e-7
    # in float32. A constant w = 1 instead: 0.25, 1.1 and 0.17; w = 4: 0.03, 0.11 and 0.07.
    assert (x.mean(0) - cond_mean).norm() < 0.08
    assert (torch.cov(x.T) - cond_cov).norm() / cond_cov.norm() < 0.1
    assert (x @ a.T - y).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_video_shapes_frame_masks_and_dtypes(dtype):
    # z [B, C, T, H, W] = [B, 1, 4, 1, 2]: the first two frames are known, the last two generated.
    mean, cov = _random_gaussian(8, seed=2)
    data = GaussianMixture.gaussian(mean, cov)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 4, 1, 1)
    known = torch.where(mask, torch.randn(1, 1, 4, 1, 2), 0.0)
    z = torch.randn(16, 1, 4, 1, 2)
    results = {}
    with torch.no_grad():
        for method in ("guided", "replacement"):
            for sampler in SAMPLERS:
                den = reconstruction_guidance(data.denoiser, known.to(dtype), mask, 2.0, method=method,
                                              generator=torch.Generator().manual_seed(4))
                x = sample(den, z.to(dtype), sampler=sampler, steps=8, generator=torch.Generator().manual_seed(5))
                assert x.shape == z.shape and x.dtype == dtype and torch.isfinite(x).all()
                assert torch.equal(x[:, :, :2], known.to(dtype)[:, :, :2].expand(16, -1, -1, -1, -1))
                results[method, sampler] = x.double()
                reference = sample(reconstruction_guidance(data.denoiser, known.double(), mask, 2.0, method=method,
                                                           generator=torch.Generator().manual_seed(4)),
                                   z.double(), sampler=sampler, steps=8, generator=torch.Generator().manual_seed(5))
                # One seed, one result in every dtype (bfloat16: rounding of the state, not new noise).
                # Measured max deviations from float64: float32 7e-7, bfloat16 0.025.
                tol = {torch.float32: 1e-5, torch.float64: 0.0, torch.bfloat16: 0.06}[dtype]
                assert (results[method, sampler] - reference).abs().max() <= tol
    assert not torch.allclose(results["guided", "ddim"], results["replacement", "ddim"])


def test_guided_needs_autograd_and_says_so():
    den = reconstruction_guidance(DATA.denoiser, KNOWN, MASK, 1.0)
    z, lam = torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        den(z, lam)
    with torch.inference_mode():  # replacement, or guided at weight 0, needs no gradient
        reconstruction_guidance(DATA.denoiser, KNOWN, MASK, method="replacement")(z, lam)
        reconstruction_guidance(DATA.denoiser, KNOWN, MASK, 0.0)(z, lam)
    detached = reconstruction_guidance(lambda z, logsnr: DATA.denoiser(z, logsnr).detach(), KNOWN, MASK, 1.0)
    with pytest.raises(RuntimeError, match="does not depend differentiably"):
        detached(z, lam)
    nested = observation_guidance(den, X_A[None], lambda x: x[:, :2])
    with pytest.raises(RuntimeError, match="guided wrapper"):
        nested(z, lam)
    detached_observation = observation_guidance(DATA.denoiser, X_A[None], lambda x: x[:, :2].detach())
    with pytest.raises(RuntimeError, match="observation"):
        detached_observation(z, lam)


_Z = torch.zeros(2, 1, 4, 1, 2)
_FRAMES = torch.tensor([True, False, False, False]).view(1, 1, 4, 1, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=_FRAMES.float()), "bool"),
    (dict(mask=_FRAMES.view(1, 4, 1, 1)), "as many dims"),
    (dict(mask=torch.ones(1, 1, 3, 1, 1, dtype=torch.bool)), "does not broadcast"),
    (dict(mask=torch.ones(1, 1, 4, 1, 1, dtype=torch.bool)), "nothing to generate"),
    (dict(mask=torch.zeros(1, 1, 4, 1, 1, dtype=torch.bool)), "nothing as known"),
    (dict(known=torch.zeros(2, 1, 4, 1, 2), mask=torch.tensor([True, False]).view(2, 1, 1, 1, 1)), "nothing"),
    (dict(known=torch.full((1, 1, 4, 1, 2), float("nan"))), "NaN"),
    (dict(weight=-1.0), ">= 0"),
    (dict(weight=float("inf")), ">= 0"),
    (dict(weight=torch.ones(2, 2)), ">= 0"),
    (dict(method="inpaint"), "unknown reconstruction method"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(known=torch.zeros(1, 1, 4, 1, 2), mask=_FRAMES, weight=1.0, method="guided") | kwargs
    with pytest.raises(ValueError, match=message):
        reconstruction_guidance(DATA.denoiser, args["known"], args["mask"], args["weight"], method=args["method"])


@pytest.mark.parametrize("z, weight, message", [
    (torch.zeros(2, 1, 5, 1, 2), 1.0, "must match"),
    (torch.zeros(2, 8), 1.0, "must match"),
    (_Z, lambda logsnr: -torch.ones_like(logsnr), ">= 0"),
    (_Z, torch.ones(3), "per-sample weight needs 2"),
])
def test_bad_calls_are_refused(z, weight, message):
    mean, cov = _random_gaussian(8, seed=2)
    den = reconstruction_guidance(GaussianMixture.gaussian(mean, cov).denoiser, torch.zeros(1, 1, 4, 1, 2), _FRAMES,
                                  weight)
    with pytest.raises(ValueError, match=message):
        den(z, torch.zeros(len(z)))


def test_bad_observations_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        observation_guidance(DATA.denoiser, torch.tensor([[float("nan")]]), lambda x: x[:, :1])
    with pytest.raises(ValueError, match=">= 0"):
        observation_guidance(DATA.denoiser, torch.zeros(1, 1), lambda x: x[:, :1], -0.5)
    den = observation_guidance(DATA.denoiser, torch.zeros(1, 2), lambda x: x[:, :3])
    with pytest.raises(ValueError, match="does not match"):
        den(torch.zeros(2, 4), torch.zeros(2))
