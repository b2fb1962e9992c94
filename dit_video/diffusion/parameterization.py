"""Noise levels, the forward process and the eps / x / v parameterizations (docs/math.md).

Every function takes log-SNR as a `[B]` tensor (or a 0-d tensor, one level for the whole
batch) and broadcasts it over the other dimensions of `z`, so the same code serves videos
`[B, C, T, H, W]`, images and plain vectors `[B, D]`. Coefficients are computed in at least
float32, so bfloat16 inputs give float32 results instead of losing the small sigmas.

    alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)
    z = alpha x + sigma eps,   v = alpha eps - sigma x,   x = alpha z - sigma v
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

Prediction = Literal["eps", "x", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x", "v")

# A denoiser maps (z, logsnr [B]) to x_hat, the estimate of the clean data; samplers know nothing else.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)), in at least float32."""
    logsnr = torch.as_tensor(logsnr)
    logsnr = logsnr.to(torch.promote_types(logsnr.dtype, torch.float32))
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def expand_like(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `[B]` (or 0-d) per-sample coefficient shaped to broadcast against `like` `[B, ...]`."""
    coef = torch.as_tensor(coef, device=like.device)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"expected a [B] log-SNR with B = {like.shape[0]}, got shape {tuple(coef.shape)}")
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def _level(logsnr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log-SNR on `like`'s device in the coefficient dtype: float64 if either is, else float32."""
    logsnr = torch.as_tensor(logsnr, device=like.device)
    work = torch.float64 if torch.float64 in (like.dtype, logsnr.dtype) else torch.float32
    return logsnr.to(work)


def alpha_sigma_like(logsnr: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha and sigma shaped to broadcast against `like` (float64 if either input is)."""
    alpha, sigma = alpha_sigma(_level(logsnr, like))
    return expand_like(alpha, like), expand_like(sigma, like)


def one_minus_snr_ratio(logsnr_t: torch.Tensor, logsnr_s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 - SNR_t / SNR_s = 1 - e^(l_t - l_s), shaped like `like`: the share of the noise
    variance added between levels s and t (posterior var = this * sigma_s^2, forward var =
    this * sigma_t^2). expm1 keeps it accurate when the two levels are close."""
    return expand_like(-torch.expm1(_level(logsnr_t, like) - _level(logsnr_s, like)), like)


def diffuse(x: torch.Tensor, logsnr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process: z = alpha x + sigma eps, a draw from q(z_t | x)."""
    alpha, sigma = alpha_sigma_like(logsnr, x)
    return alpha * x + sigma * noise


def convert(pred: torch.Tensor, z: torch.Tensor, logsnr: torch.Tensor,
            source: Prediction, target: Prediction) -> torch.Tensor:
    """Convert a prediction of `source` kind ("eps", "x" or "v") made at `z` into `target` kind.

    Each pair has its own closed form, so no conversion goes through a division by a
    vanishing alpha or sigma it does not need:
        x   = (z - sigma eps) / alpha = alpha z - sigma v
        eps = (z - alpha x) / sigma   = sigma z + alpha v
        v   = (alpha z - x) / sigma   = (eps - sigma z) / alpha
    """
    for name, kind in (("source", source), ("target", target)):
        if kind not in PREDICTIONS:
            raise ValueError(f"unknown {name} parameterization {kind!r}; choose from {', '.join(PREDICTIONS)}")
    if source == target:
        return pred
    alpha, sigma = alpha_sigma_like(logsnr, z)
    if source == "eps":
        return (z - sigma * pred) / alpha if target == "x" else (pred - sigma * z) / alpha
    if source == "x":
        return (z - alpha * pred) / sigma if target == "eps" else (alpha * z - pred) / sigma
    # source == "v"
    return alpha * z - sigma * pred if target == "x" else sigma * z + alpha * pred


def training_target(x: torch.Tensor, noise: torch.Tensor, logsnr: torch.Tensor,
                    prediction: Prediction) -> torch.Tensor:
    """What the network regresses on: eps, x, or v = alpha eps - sigma x."""
    if prediction == "eps":
        return noise
    if prediction == "x":
        return x
    if prediction == "v":
        alpha, sigma = alpha_sigma_like(logsnr, x)
        return alpha * noise - sigma * x
    raise ValueError(f"unknown parameterization {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def posterior(z_t: torch.Tensor, x: torch.Tensor, logsnr_t: torch.Tensor,
              logsnr_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z_s | z_t, x) for s < t (logsnr_s > logsnr_t): returns (mean, variance).

    mean = e^(l_t - l_s) (alpha_s / alpha_t) z_t + (1 - e^(l_t - l_s)) alpha_s x
    var  = (1 - e^(l_t - l_s)) sigma_s^2
    """
    alpha_t, sigma_t = alpha_sigma_like(logsnr_t, z_t)
    alpha_s, sigma_s = alpha_sigma_like(logsnr_s, z_t)
    # e^(l_t - l_s) alpha_s / alpha_t rewritten as alpha_t sigma_s^2 / (alpha_s sigma_t^2): no
    # division by the vanishing alpha_t of the first, pure-noise level.
    one_minus_r = one_minus_snr_ratio(logsnr_t, logsnr_s, z_t)
    mean = (alpha_t * sigma_s**2 / (alpha_s * sigma_t**2)) * z_t + one_minus_r * alpha_s * x
    return mean, one_minus_r * sigma_s**2


def transition(z_s: torch.Tensor, logsnr_s: torch.Tensor,
               logsnr_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z_t | z_s) for s < t: mean (alpha_t / alpha_s) z_s, variance (1 - e^(l_t - l_s)) sigma_t^2."""
    alpha_t, sigma_t = alpha_sigma_like(logsnr_t, z_s)
    alpha_s, _ = alpha_sigma_like(logsnr_s, z_s)
    one_minus_r = one_minus_snr_ratio(logsnr_t, logsnr_s, z_s)
    return (alpha_t / alpha_s) * z_s, one_minus_r * sigma_t**2


def model_denoiser(model: Callable[..., torch.Tensor], prediction: Prediction = "v",
                   **fixed_kwargs) -> Callable[..., torch.Tensor]:
    """D(z, logsnr, **kwargs) = x_hat from a network that predicts `prediction`.

    `fixed_kwargs` (text, cond, ...) are passed to every call; extra keyword arguments of a
    call are passed too, so the result serves both as a denoiser and as the conditional
    denoiser that classifier-free guidance batches.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown parameterization {prediction!r}; choose from {', '.join(PREDICTIONS)}")

    def denoise(z: torch.Tensor, logsnr: torch.Tensor, **kwargs) -> torch.Tensor:
        return convert(model(z, logsnr, **fixed_kwargs, **kwargs), z, logsnr, prediction, "x")

    return denoise
