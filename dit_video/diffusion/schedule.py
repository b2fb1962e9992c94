"""The continuous-time truncated cosine schedule, in log-SNR.

t runs over [0, 1]; t = 0 is (almost) clean data at `logsnr_max`, t = 1 (almost) pure noise at
`logsnr_min`. With b = arctan(exp(-l_max / 2)) and a = arctan(exp(-l_min / 2)) - b:

    logsnr(t) = -2 log tan(a t + b)         (+ 2 log(base_resolution / resolution) if shifted)

Untruncated (l_min, l_max = -inf, +inf) this is the cosine schedule alpha_t = cos(pi t / 2).
The shift (simple diffusion, Hoogeboom et al. 2023) lowers the SNR at every t for inputs
larger than the resolution the schedule was tuned for, since more pixels average out noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import param


@dataclass(frozen=True)
class CosineSchedule:
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    base_resolution: int | None = param(None, ge=1)  # set both to shift the SNR for resolution
    resolution: int | None = param(None, ge=1)

    def __post_init__(self):
        if not (math.isfinite(self.logsnr_min) and math.isfinite(self.logsnr_max)):
            raise ValueError("logsnr_min and logsnr_max must be finite")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")
        if (self.base_resolution is None) != (self.resolution is None):
            raise ValueError("the SNR shift needs both base_resolution and resolution, or neither")

    @property
    def shift(self) -> float:
        """Added to every log-SNR: 2 log(base_resolution / resolution), 0 when unshifted."""
        if self.base_resolution is None:
            return 0.0
        return 2.0 * math.log(self.base_resolution / self.resolution)

    @property
    def _ab(self) -> tuple[float, float]:
        b = math.atan(math.exp(-self.logsnr_max / 2))
        return math.atan(math.exp(-self.logsnr_min / 2)) - b, b

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """log-SNR at time(s) t in [0, 1]; computed in float64, returned in t's float dtype."""
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        a, b = self._ab
        lam = -2.0 * torch.log(torch.tan(a * t.double() + b)) + self.shift
        return lam.to(out_dtype)

    def time(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The inverse: t for a given log-SNR (clamped to [0, 1])."""
        logsnr = torch.as_tensor(logsnr)
        out_dtype = logsnr.dtype if logsnr.is_floating_point() else torch.float32
        a, b = self._ab
        t = (torch.atan(torch.exp(-(logsnr.double() - self.shift) / 2)) - b) / a
        return t.clamp(0.0, 1.0).to(out_dtype)

    def sample_logsnr(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Training noise levels: t ~ U(0, 1), one per sample, mapped to log-SNR `[batch]`."""
        t = torch.rand(batch, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else device)
        return self.logsnr(t).float().to(device)

    def grid(self, steps: int, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`steps + 1` log-SNR levels, uniform in t from t = 1 (noise) down to t = 0 (data)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return self.logsnr(t).to(device=device, dtype=dtype)
