import pytest
import torch

from dit_video.diffusion import (CosineSchedule, DiffusionConfig, convert, diffuse, diffusion_loss, loss_weight,
                                 training_loss, training_target)

LEVELS = torch.tensor([-20.0, -6.0, -1.0, 0.0, 1.6, 5.0, 20.0], dtype=torch.float64)


def _setup():
    x = torch.randn(7, 2, 3, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    z = diffuse(x, LEVELS, eps)
    x_hat = x + 0.25 * torch.randn_like(x)
    mse_x = (x - x_hat).square().flatten(1).mean(1)
    return x, eps, z, x_hat, mse_x


@pytest.mark.parametrize("weighting, w", [
    ("snr", lambda snr: snr),
    ("snr+1", lambda snr: snr + 1),
    ("min_snr", lambda snr: snr.clamp(max=5.0)),
    ("truncated_snr", lambda snr: snr.clamp(min=1.0)),
])
def test_each_weighting_is_the_same_x_space_loss_for_every_target(weighting, w):
    x, eps, z, x_hat, mse_x = _setup()
    expected = w(LEVELS.exp()) * mse_x
    for prediction in ("eps", "x", "v"):
        output = convert(x_hat, z, LEVELS, "x", prediction)  # the same network prediction, reparameterized
        loss = diffusion_loss(output, x, eps, LEVELS, prediction=prediction, weighting=weighting)
        assert loss.shape == (7,)
        torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0, msg=f"{prediction}")


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_no_weighting_is_the_plain_mse_of_the_target(prediction):
    x, eps, z, x_hat, _ = _setup()
    output = torch.randn_like(x)
    target = training_target(x, eps, LEVELS, prediction)
    expected = (output - target).square().flatten(1).mean(1)
    torch.testing.assert_close(diffusion_loss(output, x, eps, LEVELS, prediction=prediction).double(), expected,
                               rtol=1e-6, atol=0)


def test_min_snr_gamma_caps_the_weight():
    lam = torch.log(torch.tensor([0.5, 3.0, 10.0, 100.0]))
    # for v-prediction the factor is min(SNR, gamma) / (SNR + 1)
    factor = loss_weight(lam, "v", "min_snr", min_snr_gamma=3.0)
    torch.testing.assert_close(factor, torch.tensor([0.5 / 1.5, 3 / 4, 3 / 11, 3 / 101]))


def test_loss_is_float32_for_bfloat16_outputs_and_finite_at_the_ends():
    x = torch.randn(2, 8)
    eps = torch.randn_like(x)
    lam = torch.tensor([-20.0, 20.0])
    loss = diffusion_loss(torch.randn(2, 8).bfloat16(), x, eps, lam, prediction="v", weighting="min_snr")
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_unknown_names_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        diffusion_loss(x, x, x, torch.zeros(2), weighting="p2")
    with pytest.raises(ValueError, match="unknown parameterization"):
        diffusion_loss(x, x, x, torch.zeros(2), prediction="score")


def test_training_loss_is_the_configured_loss_at_drawn_levels():
    cfg = DiffusionConfig(prediction="eps", weighting="min_snr", min_snr_gamma=2.0,
                          schedule=CosineSchedule(logsnr_min=-10.0, logsnr_max=10.0))
    x = torch.randn(6, 3, 2, 4, 4)
    seen = {}

    def model(z, logsnr, scale):
        seen.update(z=z, logsnr=logsnr)
        return scale * z

    loss = training_loss(model, x, cfg, generator=torch.Generator().manual_seed(0), scale=0.5)
    # the same draws, by hand: levels first, then noise
    gen = torch.Generator().manual_seed(0)
    logsnr = cfg.schedule.sample_logsnr(6, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(seen["logsnr"], logsnr)
    torch.testing.assert_close(seen["z"], diffuse(x, logsnr, noise))
    assert seen["logsnr"].min() >= -10 and seen["logsnr"].max() <= 10
    expected = diffusion_loss(0.5 * seen["z"], x, noise, logsnr, prediction="eps", weighting="min_snr", min_snr_gamma=2.0)
    torch.testing.assert_close(loss, expected)
