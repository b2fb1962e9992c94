"""The training loss: MSE in the chosen target space, with a weighting over noise levels.

Every (target, weighting) pair is a weighted x-space MSE, w(logsnr) ||x - x_hat||^2, because
||eps - eps_hat||^2 = SNR ||x - x_hat||^2 and ||v - v_hat||^2 = (1 + SNR) ||x - x_hat||^2.
`weighting` names that x-space weight w; the factor applied to the MSE in the target space is
w divided by the target's own weight (eps: SNR, v: SNR + 1, x: 1):

    none           the target space's own weight (plain MSE on eps, v or x)
    snr            SNR                 (what eps-prediction gives)
    snr+1          SNR + 1             (what v-prediction gives)
    min_snr        min(SNR, gamma)     (Min-SNR-gamma, Hang et al. 2023)
    truncated_snr  max(SNR, 1)         (progressive distillation, Salimans & Ho 2022)
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .config import DiffusionConfig
from .parameterization import PREDICTIONS, Prediction, diffuse, training_target

Weighting = Literal["none", "snr", "snr+1", "min_snr", "truncated_snr"]
WEIGHTINGS: tuple[str, ...] = ("none", "snr", "snr+1", "min_snr", "truncated_snr")


def x_space_weight(logsnr: torch.Tensor, weighting: Weighting, min_snr_gamma: float = 5.0) -> torch.Tensor:
    """w(logsnr), the weight the loss puts on ||x - x_hat||^2 (for weighting != "none")."""
    snr = torch.exp(logsnr.double())
    if weighting == "snr":
        return snr
    if weighting == "snr+1":
        return snr + 1
    if weighting == "min_snr":
        return snr.clamp(max=min_snr_gamma)
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")


def loss_weight(logsnr: torch.Tensor, prediction: Prediction, weighting: Weighting,
                min_snr_gamma: float = 5.0) -> torch.Tensor:
    """The `[B]` factor on the target-space MSE that realizes `weighting` for `prediction`."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown parameterization {prediction!r}; choose from {', '.join(PREDICTIONS)}")
    if weighting == "none":
        return torch.ones_like(logsnr, dtype=torch.float32)
    snr = torch.exp(logsnr.double())
    own = {"eps": snr, "v": snr + 1, "x": torch.ones_like(snr)}[prediction]
    return (x_space_weight(logsnr, weighting, min_snr_gamma) / own).float()


def diffusion_loss(output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, logsnr: torch.Tensor, *,
                   prediction: Prediction = "v", weighting: Weighting = "none",
                   min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss `[B]` of a network `output` made at z = alpha x + sigma noise.

    The MSE is averaged over all non-batch dimensions in at least float32 (bfloat16 outputs give
    a float32 loss); reduce over the batch (or mask) as the caller needs.
    """
    target = training_target(x, noise, logsnr, prediction)
    dtype = torch.promote_types(torch.promote_types(output.dtype, target.dtype), torch.float32)
    mse = (output.to(dtype) - target.to(dtype)).square().flatten(1).mean(dim=1)
    weight = loss_weight(logsnr, prediction, weighting, min_snr_gamma)
    return mse * weight.to(device=mse.device, dtype=dtype)


def training_loss(model: Callable[..., torch.Tensor], x: torch.Tensor, cfg: DiffusionConfig,
                  generator: torch.Generator | None = None, **model_kwargs) -> torch.Tensor:
    """The per-sample `[B]` loss of one training step as `cfg` defines it: a noise level per sample,
    uniform in t over `cfg.schedule`, z = alpha x + sigma noise, and `diffusion_loss` of
    `model(z, logsnr, **model_kwargs)` for `cfg.prediction` with `cfg.weighting`."""
    logsnr = cfg.schedule.sample_logsnr(x.shape[0], generator=generator, device=x.device)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)
    output = model(diffuse(x, logsnr, noise).to(x.dtype), logsnr, **model_kwargs)
    return diffusion_loss(output, x, noise, logsnr, prediction=cfg.prediction, weighting=cfg.weighting,
                          min_snr_gamma=cfg.min_snr_gamma)
