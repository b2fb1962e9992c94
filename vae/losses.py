"""Training losses of the VAE: reconstruction, KL, and an optional 3D patch discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 1.0) -> torch.Tensor:
    """l1 |x - x_hat| + l2 (x - x_hat)^2, averaged over every element."""
    diff = (x_hat.float() - x.float())
    return l1_weight * diff.abs().mean() + l2_weight * diff.square().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over latent elements."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


class PatchDiscriminator3D(nn.Module):
    """Scores overlapping space-time patches of a video as real or fake (one logit per patch).
    Strided in space only, with a padded 3-frame kernel in time, so images (T = 1) go through it
    too."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks, c_in = [], in_channels
        for i in range(layers):
            c_out = channels * 2**i
            blocks += [nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
                       nn.GroupNorm(min(32, c_out), c_out) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c_in = c_out
        blocks.append(nn.Conv3d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
