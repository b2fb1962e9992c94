"""Samplers over a denoiser D(z, logsnr) -> x_hat: DDIM, ancestral (VDM) and predictor-corrector.

The single steps are plain functions of (z, x_hat, logsnr_t, logsnr_s) with `[B]` log-SNRs,
s the less noisy level. `sample` runs one of them on a grid uniform in t over the schedule,
from t = 1 down to t = 0; the last step returns x_hat, not z. Nothing is clipped.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from tqdm.auto import tqdm

from .parameterization import Denoiser, alpha_sigma_like, one_minus_snr_ratio, posterior
from .schedule import CosineSchedule

Sampler = Literal["ddim", "ancestral", "pc"]
SAMPLERS: tuple[str, ...] = ("ddim", "ancestral", "pc")


def ddim_step(z: torch.Tensor, x_hat: torch.Tensor, logsnr_t: torch.Tensor, logsnr_s: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise, c^2 = eta^2 Var[q(z_s | z_t, x)].

    eta = 0 is deterministic (DDIM); eta = 1 is the ancestral step with gamma = 0.
    """
    alpha_t, sigma_t = alpha_sigma_like(logsnr_t, z)
    alpha_s, sigma_s = alpha_sigma_like(logsnr_s, z)
    eps_hat = (z - alpha_t * x_hat) / sigma_t
    if eta == 0:
        return alpha_s * x_hat + sigma_s * eps_hat
    c2 = eta**2 * one_minus_snr_ratio(logsnr_t, logsnr_s, z) * sigma_s**2
    noise = torch.randn_like(z) if noise is None else noise
    return alpha_s * x_hat + (sigma_s**2 - c2).clamp(min=0).sqrt() * eps_hat + c2.sqrt() * noise


def ancestral_step(z: torch.Tensor, x_hat: torch.Tensor, logsnr_t: torch.Tensor, logsnr_s: torch.Tensor,
                   gamma: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A draw from q(z_s | z_t, x = x_hat) with the variance of VDM: var^(1-gamma) * sigma2_ts^gamma.

    var = (1 - e^(l_t - l_s)) sigma_s^2 is the posterior variance (gamma = 0) and
    sigma2_ts = (1 - e^(l_t - l_s)) sigma_t^2 the forward one (gamma = 1).
    """
    mean, _ = posterior(z, x_hat, logsnr_t, logsnr_s)
    _, sigma_t = alpha_sigma_like(logsnr_t, z)
    _, sigma_s = alpha_sigma_like(logsnr_s, z)
    # sqrt(var^(1-g) sigma2_ts^g) = sqrt(1 - e^(l_t - l_s)) sigma_s^(1-g) sigma_t^g
    std = one_minus_snr_ratio(logsnr_t, logsnr_s, z).sqrt() * sigma_s ** (1 - gamma) * sigma_t**gamma
    noise = torch.randn_like(z) if noise is None else noise
    return mean + std * noise


def langevin_step(denoiser: Denoiser, z: torch.Tensor, logsnr: torch.Tensor, delta: float = 0.1,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One Langevin corrector step at level `logsnr`, with score -eps_hat / sigma and step delta sigma^2:

    z <- z - 0.5 delta sigma eps_hat(z) + sqrt(delta) sigma noise
    """
    alpha, sigma = alpha_sigma_like(logsnr, z)
    eps_hat = (z - alpha * denoiser(z, logsnr)) / sigma
    noise = torch.randn_like(z) if noise is None else noise
    return z - 0.5 * delta * sigma * eps_hat + math.sqrt(delta) * sigma * noise


def check_sampler_args(sampler: str, steps: int, eta: float = 0.0, gamma: float = 0.0,
                       corrector_steps: int = 1, delta: float = 0.1) -> None:
    """ValueError for an unknown sampler, an out-of-range value, or a setting the chosen sampler
    would ignore (eta is DDIM's; gamma belongs to ancestral and pc; corrector_steps and delta to pc)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if delta <= 0 or corrector_steps < 0:
        raise ValueError(f"need delta > 0 and corrector_steps >= 0, got {delta} and {corrector_steps}")
    ignored = {"eta": sampler != "ddim" and eta != 0, "gamma": sampler == "ddim" and gamma != 0,
               "corrector_steps": sampler != "pc" and corrector_steps != 1,
               "delta": sampler != "pc" and delta != 0.1}
    for name, unused in ignored.items():
        if unused:
            raise ValueError(f"{name} does not apply to the {sampler!r} sampler")


def sample(denoiser: Denoiser, z: torch.Tensor, *, sampler: Sampler = "ddim", steps: int = 50,
           schedule: CosineSchedule | None = None, eta: float = 0.0, gamma: float = 0.0,
           corrector_steps: int = 1, delta: float = 0.1, generator: torch.Generator | None = None,
           progress: bool | str = False) -> torch.Tensor:
    """Run `sampler` from the noise `z` ([B, ...], any shape) and return the final x_hat.

    sampler: "ddim" (eta: 0 deterministic, 1 ancestral-equivalent), "ancestral" (gamma in [0, 1]
        interpolates the posterior and forward variances, log-linearly as in VDM) or "pc"
        (ancestral predictor, then `corrector_steps` Langevin steps of size `delta` after each).
    steps: denoiser evaluations of the predictor, on a grid uniform in t over `schedule`
        (default: the cosine schedule over log-SNR [-20, 20]).
    generator: the source of the sampler's own noise, for reproducible stochastic samplers.
    progress: show a progress bar over the steps; a string names it (e.g. the stage).

    The state is kept in at least float32 whatever z's dtype; the denoiser is called with z in
    the dtype given and a `[B]` log-SNR, and the result comes back in that dtype.
    """
    check_sampler_args(sampler, steps, eta, gamma, corrector_steps, delta)
    if z.ndim < 1 or z.shape[0] == 0:
        raise ValueError(f"z must be a non-empty batch [B, ...], got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("the initial noise z contains NaN or infinite values")

    schedule = schedule or CosineSchedule()
    in_dtype, batch = z.dtype, z.shape[0]
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    levels = schedule.grid(steps, device=z.device, dtype=work)

    def denoise(z_work: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return denoiser(z_work.to(in_dtype), level).to(work)

    def fresh_noise() -> torch.Tensor:
        # Drawn in float32 whatever the dtype, so one seed gives the same sample in every precision.
        device = generator.device if generator is not None else z.device
        return torch.randn(z.shape, generator=generator, device=device).to(device=z.device, dtype=work)

    z = z.to(work)
    for i in tqdm(range(steps), desc=progress if isinstance(progress, str) else sampler,
                  disable=not progress, leave=False):
        logsnr_t, logsnr_s = levels[i].repeat(batch), levels[i + 1].repeat(batch)
        x_hat = denoise(z, logsnr_t)
        if i == steps - 1:
            break
        if sampler == "ddim":
            z = ddim_step(z, x_hat, logsnr_t, logsnr_s, eta, noise=fresh_noise() if eta > 0 else None)
        else:
            z = ancestral_step(z, x_hat, logsnr_t, logsnr_s, gamma, noise=fresh_noise())
        if sampler == "pc":
            for _ in range(corrector_steps):
                z = langevin_step(denoise, z, logsnr_s, delta, noise=fresh_noise())
    return x_hat.to(in_dtype)
