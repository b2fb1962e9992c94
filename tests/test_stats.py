"""The evaluation's confidence intervals: Wilson's against its closed form and its coverage, the
bootstrap against the normal interval it approaches for a large sample."""

import math

import pytest
import torch

from dit_video.eval.stats import mean_interval, proportion_interval


def test_wilson_interval_matches_the_closed_form():
    lo, hi = proportion_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    z2 = 1.959964 ** 2
    assert proportion_interval(0, 50) == (0.0, pytest.approx(z2 / (50 + z2), rel=1e-5))  # the rule of three's cousin
    assert proportion_interval(50, 50) == (pytest.approx(50 / (50 + z2), rel=1e-5), 1.0)
    assert proportion_interval(9, 10, confidence=0.99)[0] < proportion_interval(9, 10)[0]


def test_wilson_interval_covers_the_true_rate_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(0)
    for p, n in ((0.05, 100), (0.5, 30), (0.95, 540)):
        hits = (torch.rand(4000, n, generator=generator) < p).sum(1)
        covered = sum(lo <= p <= hi for lo, hi in (proportion_interval(int(k), n) for k in hits))
        assert 0.925 <= covered / 4000 <= 0.975, (p, n, covered)


def test_bootstrap_interval_of_a_mean_approaches_the_normal_one():
    x = 3 + 2 * torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lo, hi = mean_interval(x)
    half = 1.96 * x.std().item() / math.sqrt(len(x))
    assert lo < x.mean().item() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert mean_interval(x) == (lo, hi) and mean_interval(x, seed=1) != (lo, hi)  # seeded
    with pytest.raises(ValueError, match="at least 2 finite values"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="successes <= n"):
        proportion_interval(3, 2)
