"""End to end: a small network trained with `diffusion_loss` becomes a denoiser the samplers can use.

The exact denoiser of the data is the Bayes-optimal predictor, so its loss is the floor the
trained network must approach, and its samples must reproduce the mixture."""

import math

import torch
from torch import nn

from dit_video.diffusion import DiffusionConfig, GaussianMixture, diffuse, model_denoiser, sample, training_loss

MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
                          [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.1], [-0.1, 0.25]]])


class TinyDenoiser(nn.Module):
    """An MLP on (z, Fourier features of log-SNR)."""

    def __init__(self, dim: int = 2, width: int = 128, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.05), math.log(2.0), freqs)))
        self.net = nn.Sequential(nn.Linear(dim + 2 * freqs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, z, logsnr):
        angles = logsnr[:, None] * self.freqs
        return self.net(torch.cat([z, angles.sin(), angles.cos()], dim=1))


def test_a_trained_v_network_approaches_the_bayes_loss_and_samples_the_data():
    # v-prediction, the default, with its own (SNR + 1) weighting. eps- and x-prediction are not
    # held to this bar on purpose: over logsnr [-20, 20] their x_hat turns a small network error
    # into a huge x-space one at one end (eps: divided by alpha = 4.5e-5; x: weighted by SNR = 5e8).
    cfg = DiffusionConfig(prediction="v", weighting="snr+1")
    torch.manual_seed(0)
    model = TinyDenoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = 1500
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = training_loss(model, MIXTURE.sample(512, generator=gen)[0].float(), cfg, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    # Held-out x-space error, (SNR + 1)-weighted, of the network and of the exact E[x | z].
    x = MIXTURE.sample(20_000, generator=gen)[0].float()
    logsnr, noise = cfg.schedule.sample_logsnr(20_000, generator=gen), torch.randn(20_000, 2, generator=gen)
    z = diffuse(x, logsnr, noise)
    weight = logsnr.double().exp() + 1
    with torch.no_grad():
        learned = model_denoiser(model, cfg.prediction)(z, logsnr)
    err = lambda x_hat: (weight * (x_hat.double() - x).square().sum(1)).mean().item()  # noqa: E731
    bayes, net, mean_only = err(MIXTURE.denoiser(z, logsnr)), err(learned), err(MIXTURE.mean.expand(20_000, 2))
    assert net < 1.15 * bayes, (net, bayes)
    assert net < 0.5 * mean_only

    with torch.no_grad():
        samples = sample(model_denoiser(model, cfg.prediction), torch.randn(4000, 2, generator=gen), steps=64)
    fractions = torch.bincount(MIXTURE.component_of(samples), minlength=3).double() / 4000
    torch.testing.assert_close(fractions, MIXTURE.weights, rtol=0, atol=0.05)
