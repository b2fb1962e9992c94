"""Guidance: wrappers that take a denoiser and return a denoiser (docs/math.md, "Guidance").

Weights follow the papers: x_tilde = (1 + w) x_hat(z, c) - w x_hat(z, null), so w = 0 is the
plain conditional model; diffusers' `guidance_scale` s is 1 + w. The combination is linear,
hence the same in eps, v or x space for a fixed z, and it is done here in x space.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from .config import GuidanceConfig
from .parameterization import Denoiser, expand_like
from .schedule import CosineSchedule

# A guidance weight: a number, a [B] tensor, or a function of the [B] log-SNR giving either.
Weight = float | torch.Tensor | Callable[[torch.Tensor], "float | torch.Tensor"]


def classifier_free_guidance(denoiser: Callable[..., torch.Tensor], weight: Weight,
                             cond: Mapping[str, torch.Tensor | None],
                             uncond: Mapping[str, torch.Tensor | None], rescale: float = 0.0) -> Denoiser:
    """x_tilde = (1 + w) D(z, **cond) - w D(z, **uncond), both halves in one batched call.

    denoiser: the conditional denoiser, D(z, logsnr, **kwargs) -> x_hat.
    cond, uncond: keyword arguments of the two halves (e.g. text and text_mask, with the null
        text for uncond); same keys, tensors of matching shapes with the batch first, or None.
    weight: w (see `Weight`); where w is 0 for the whole batch the unconditional half is skipped.
    rescale: guidance rescale phi (Lin et al. 2023): blend x_tilde with x_tilde * std(x_c) /
        std(x_tilde), per sample, to undo the over-saturation of large w; 0 is off.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    for key in cond:
        c, u = cond[key], uncond[key]
        if (c is None) != (u is None) or (c is not None and c.shape[1:] != u.shape[1:]):
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be None or tensors of one shape "
                             f"past the batch dim, got {_shape(c)} and {_shape(u)}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    both = {k: None if cond[k] is None else torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        w = weight(logsnr) if callable(weight) else weight
        w = torch.as_tensor(w, device=z.device, dtype=torch.float32)
        if bool((w == 0).all()):
            return denoiser(z, logsnr, **cond)
        x_c, x_u = denoiser(torch.cat([z, z]), torch.cat([logsnr, logsnr]), **both).chunk(2)
        w = expand_like(w, x_c)
        x = x_c + w * (x_c - x_u)
        if rescale > 0:
            x = rescale * guidance_rescale(x, x_c) + (1 - rescale) * x
        return x

    return guided


def guidance_rescale(x_guided: torch.Tensor, x_cond: torch.Tensor) -> torch.Tensor:
    """x_guided scaled per sample to the standard deviation of the conditional prediction."""
    dims = tuple(range(1, x_guided.ndim))
    ratio = x_cond.float().std(dim=dims, keepdim=True) / x_guided.float().std(dim=dims, keepdim=True).clamp(min=1e-12)
    return x_guided * ratio.to(x_guided.dtype)


class OscillatingWeight:
    """Imagen Video's oscillating guidance weight: `high` for the first round(high_fraction *
    steps) steps, then alternating high, low, high, ... (a function of log-SNR, for CFG).

    The step index is read off the log-SNR on the sampler's grid (uniform in t over the same
    schedule), so it needs the same `steps` and `schedule` as the sampler; a corrector step at
    level s counts as the step that starts there.
    """

    def __init__(self, high: float, low: float, steps: int, high_fraction: float = 0.25,
                 schedule: CosineSchedule | None = None):
        if steps < 1 or not 0 <= high_fraction <= 1:
            raise ValueError(f"need steps >= 1 and high_fraction in [0, 1], got {steps} and {high_fraction}")
        self.high, self.low, self.steps = high, low, steps
        self.high_steps = round(high_fraction * steps)
        self.schedule = schedule or CosineSchedule()

    def step_index(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Which predictor step (0 = the first, at pure noise) a log-SNR level belongs to."""
        return torch.round((1 - self.schedule.time(logsnr.double())) * self.steps).long()

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        i = self.step_index(logsnr)
        low = (i >= self.high_steps) & ((i - self.high_steps) % 2 == 1)
        return torch.where(low, self.low, self.high).float()


def dynamic_threshold(x: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, percentile of |x|) per sample, then clip to
    [-s, s] and divide by s, so the result lies in [-1, 1] and values inside [-1, 1] with
    s = 1 are untouched. The percentile is the nearest-rank one (works for any tensor size)."""
    if not 0 < percentile <= 1:
        raise ValueError(f"threshold percentile must be in (0, 1], got {percentile}")
    flat = x.detach().flatten(1).abs().float()
    k = max(1, math.ceil(percentile * flat.shape[1]))
    s = flat.kthvalue(k, dim=1).values.clamp(min=1.0).to(x.dtype)
    s = expand_like(s, x)
    return torch.maximum(torch.minimum(x, s), -s) / s


def dynamic_thresholding(denoiser: Denoiser, percentile: float = 0.995) -> Denoiser:
    """The denoiser with its x_hat passed through `dynamic_threshold`."""
    if not 0 < percentile <= 1:
        raise ValueError(f"threshold percentile must be in (0, 1], got {percentile}")
    return lambda z, logsnr: dynamic_threshold(denoiser(z, logsnr), percentile)


def guided_denoiser(denoiser: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor | None],
                    uncond: Mapping[str, torch.Tensor | None], cfg: GuidanceConfig, *, steps: int,
                    schedule: CosineSchedule | None = None) -> Denoiser:
    """The denoiser a sampler runs, as `cfg` asks: classifier-free guidance (oscillating if
    `cfg.weight_low` is set, with rescale), then dynamic thresholding if a percentile is set.
    `steps` and `schedule` must be the sampler's (they place the oscillation)."""
    weight: Weight = cfg.weight
    if cfg.weight_low is not None:
        weight = OscillatingWeight(cfg.weight, cfg.weight_low, steps, cfg.high_fraction, schedule)
    guided = classifier_free_guidance(denoiser, weight, cond, uncond, rescale=cfg.rescale)
    if cfg.threshold_percentile is not None:
        guided = dynamic_thresholding(guided, cfg.threshold_percentile)
    return guided


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))
