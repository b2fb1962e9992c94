import pytest
import torch

from dit_video.diffusion import (alpha_sigma, convert, diffuse, model_denoiser, posterior, training_target,
                                 transition)

LEVELS = torch.tensor([-20.0, -7.5, -1.0, 0.0, 2.0, 9.0, 20.0], dtype=torch.float64)


def test_alpha_sigma_identities():
    alpha, sigma = alpha_sigma(LEVELS)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(LEVELS))
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), LEVELS)
    # bfloat16 levels give float32 coefficients (sigma at logsnr 20 is 4.5e-5)
    a, s = alpha_sigma(LEVELS.bfloat16())
    assert a.dtype == torch.float32 and (s > 0).all()


def _triplet(shape=(7, 3, 2, 4, 4)):
    """x, eps, logsnr and z for a video-shaped batch, in float64."""
    x = torch.randn(shape, dtype=torch.float64)
    eps = torch.randn(shape, dtype=torch.float64)
    return x, eps, LEVELS, diffuse(x, LEVELS, eps)


def test_diffuse_is_alpha_x_plus_sigma_eps():
    x, eps, lam, z = _triplet()
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(z, alpha.view(-1, 1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1, 1) * eps)


def test_every_conversion_against_the_truth():
    x, eps, lam, z = _triplet()
    alpha, sigma = (c.view(-1, 1, 1, 1, 1) for c in alpha_sigma(lam))
    truth = {"x": x, "eps": eps, "v": alpha * eps - sigma * x}
    torch.testing.assert_close(training_target(x, eps, lam, "v"), truth["v"])
    for source in truth:
        for target in truth:
            got = convert(truth[source], z, lam, source, target)
            # dividing by alpha (eps -> x at logsnr -20) amplifies rounding by 1/alpha = 2e4
            torch.testing.assert_close(got, truth[target], rtol=1e-6, atol=1e-6,
                                       msg=f"{source} -> {target}")
            back = convert(got, z, lam, target, source)
            torch.testing.assert_close(back, truth[source], rtol=1e-6, atol=1e-6,
                                       msg=f"{source} -> {target} -> {source}")


def test_x_from_v_has_the_minus_sign():
    # The classic bug: x_hat = alpha z + sigma v. At logsnr 0 the two differ by sqrt(2) v.
    z, v = torch.ones(1, 2), torch.ones(1, 2)
    lam = torch.zeros(1)
    a = 0.5**0.5
    torch.testing.assert_close(convert(v, z, lam, "v", "x"), torch.full((1, 2), a * 1 - a * 1))


def test_noising_has_the_right_marginals():
    # x ~ N(m, s^2)  =>  z_t ~ N(alpha m, alpha^2 s^2 + sigma^2)
    n, m, s = 400_000, 1.5, 0.7
    lam = torch.full((n,), 0.8)
    x = m + s * torch.randn(n, 1)
    z = diffuse(x, lam, torch.randn(n, 1))
    alpha, sigma = (c[0].item() for c in alpha_sigma(lam))
    assert z.mean().item() == pytest.approx(alpha * m, abs=4e-3)
    assert z.var().item() == pytest.approx(alpha**2 * s**2 + sigma**2, rel=1e-2)


def _bayes_posterior(z_t, x, lt, ls):
    """q(z_s | z_t, x) by conditioning the joint Gaussian of (z_s, z_t) given x."""
    (a_t, s_t), (a_s, s_s) = alpha_sigma(lt), alpha_sigma(ls)
    cov_st = (a_t / a_s) * s_s**2  # Cov(z_s, z_t | x)
    gain = cov_st / s_t**2
    return a_s * x + gain * (z_t - a_t * x), s_s**2 - gain * cov_st


@pytest.mark.parametrize("lt, ls", [(-20.0, -19.0), (-3.0, 1.0), (4.0, 4.5), (18.0, 20.0), (-20.0, 20.0)])
def test_posterior_matches_gaussian_conditioning(lt, ls):
    lt, ls = torch.tensor([lt], dtype=torch.float64), torch.tensor([ls], dtype=torch.float64)
    z_t, x = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    mean, var = posterior(z_t, x, lt, ls)
    ref_mean, ref_var = _bayes_posterior(z_t, x, lt, ls)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var.flatten(), ref_var.flatten(), rtol=1e-9, atol=1e-12)


def test_transition_composes_to_the_marginal():
    # z_s = alpha_s x + sigma_s eps, then q(z_t | z_s): total mean alpha_t x and variance sigma_t^2.
    ls, lt = torch.tensor([3.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    x = torch.randn(1, 4, dtype=torch.float64)
    (a_s, s_s), (a_t, s_t) = alpha_sigma(ls), alpha_sigma(lt)
    scale, var = transition(torch.ones(1, 4, dtype=torch.float64), ls, lt)
    ratio = scale[0, 0]  # alpha_t / alpha_s
    torch.testing.assert_close(ratio * a_s * x, a_t * x)
    torch.testing.assert_close(ratio**2 * s_s**2 + var.flatten(), s_t**2)


def test_loss_identities_between_spaces():
    # ||v - v_hat||^2 = (1 + SNR) ||x - x_hat||^2 and ||eps - eps_hat||^2 = SNR ||x - x_hat||^2
    x, eps, lam, z = _triplet((7, 16))
    x_hat = x + 0.3 * torch.randn_like(x)
    snr = lam.exp()
    err_x = (x - x_hat).square().sum(1)
    err_v = (convert(x, z, lam, "x", "v") - convert(x_hat, z, lam, "x", "v")).square().sum(1)
    err_eps = (eps - convert(x_hat, z, lam, "x", "eps")).square().sum(1)
    torch.testing.assert_close(err_v, (1 + snr) * err_x, rtol=1e-9, atol=0)
    torch.testing.assert_close(err_eps, snr * err_x, rtol=1e-9, atol=0)


def test_model_denoiser_turns_a_perfect_prediction_into_x():
    x, eps, lam, z = _triplet((7, 6))
    for kind in ("eps", "x", "v"):
        net = lambda zz, ll, target=kind, scale=1.0: scale * training_target(x, eps, ll, target)  # noqa: E731
        torch.testing.assert_close(model_denoiser(net, kind)(z, lam), x, rtol=1e-6, atol=1e-6)
    # keyword arguments reach the network, both fixed ones and per call
    net = lambda zz, ll, scale: scale * training_target(x, eps, ll, "x")  # noqa: E731
    torch.testing.assert_close(model_denoiser(net, "x", scale=2.0)(z, lam), 2 * x)
    torch.testing.assert_close(model_denoiser(net, "x")(z, lam, scale=3.0), 3 * x)


def test_bad_arguments_are_refused():
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\[B\] log-SNR with B = 4"):
        diffuse(z, torch.zeros(3), z)
    with pytest.raises(ValueError, match="unknown target parameterization 'score'"):
        convert(z, z, torch.zeros(4), "eps", "score")
    with pytest.raises(ValueError, match="unknown parameterization"):
        model_denoiser(lambda z, l: z, "noise")


def test_low_precision_and_extreme_levels_stay_finite():
    lam = torch.tensor([-20.0, 20.0])
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        z = torch.randn(2, 3, 4).to(dtype)
        for source, target in [("eps", "x"), ("x", "eps"), ("v", "x"), ("x", "v"), ("eps", "v")]:
            out = convert(z, z, lam, source, target)
            assert torch.isfinite(out).all(), (dtype, source, target)
