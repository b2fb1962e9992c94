"""Confidence intervals for the evaluation's figures, so that a difference between two runs can be
told from the noise of a few hundred videos.

- `proportion_interval`: an accuracy (k right of n), by the Wilson score interval, which stays
  inside [0, 1] and keeps its coverage near 0 and 1, where the normal approximation's does not.
- `mean_interval`: the mean of a measure (say the boundary jump of extended videos), by the
  percentile bootstrap: no normality assumed, which a ratio like the jump does not have. For a
  paired comparison pass the per-prompt differences.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import torch


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a proportion of `successes` out of `n` trials."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamp the rounding of p = 0 or 1 (centre - half is 0 there exactly in real arithmetic)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float] | torch.Tensor, confidence: float = 0.95, resamples: int = 10_000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval (lo, hi) for the mean of `values` (at least 2)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() < 2 or not torch.isfinite(x).all():
        raise ValueError(f"need at least 2 finite values, got {x.numel()}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(x.numel(), (resamples, x.numel()), generator=generator)
    means = x[picks].mean(1)
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi
