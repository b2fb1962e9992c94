"""The config sections of the diffusion math: the objective, the sampler, the guidance and the
cascade's conditioning.

They are plain dataclasses; `dit_video.config.load_config` fills and validates them from YAML.
Field names match the keyword arguments of the functions they feed (`sample`, `diffusion_loss`,
`guided_denoiser`), and every field is used there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from ..config import param
from .samplers import check_sampler_args
from .schedule import CosineSchedule


@dataclass
class DiffusionConfig:
    """What a diffusion model is trained on: the schedule, the target and the loss weighting."""

    prediction: Literal["v", "eps", "x"] = "v"
    weighting: Literal["none", "snr", "snr+1", "min_snr", "truncated_snr"] = "none"
    min_snr_gamma: float = param(5.0, gt=0)  # used by weighting "min_snr"
    schedule: CosineSchedule = field(default_factory=CosineSchedule)

    def __post_init__(self):
        if self.weighting != "min_snr" and self.min_snr_gamma != 5.0:
            raise ValueError("min_snr_gamma applies to weighting 'min_snr' only")


@dataclass
class SamplerConfig:
    """`sample(denoiser, z, **cfg.kwargs())`; see `dit_video.diffusion.sample`."""

    sampler: Literal["ddim", "ancestral", "pc"] = "ddim"
    steps: int = param(50, ge=1)
    eta: float = param(0.0, ge=0, le=1)  # ddim: 0 deterministic, 1 ancestral-like
    gamma: float = param(0.0, ge=0, le=1)  # ancestral, pc: 0 posterior variance, 1 forward variance
    corrector_steps: int = param(1, ge=0)  # pc: Langevin steps after each predictor step
    delta: float = param(0.1, gt=0)  # pc: Langevin step size, in units of sigma^2

    def __post_init__(self):
        check_sampler_args(**self.kwargs())

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass
class GuidanceConfig:
    """Classifier-free guidance x = (1 + w) x_c - w x_u; w = 0 is off (diffusers' scale = 1 + w)."""

    weight: float = param(0.0, ge=0)
    weight_low: float | None = param(None, ge=0)  # set to oscillate between weight and weight_low
    high_fraction: float = param(0.25, ge=0, le=1)  # oscillating: share of first steps at `weight`
    rescale: float = param(0.0, ge=0, le=1)  # guidance rescale phi; 0 is off
    threshold_percentile: float | None = param(None, gt=0, le=1)  # dynamic thresholding; None is off

    def __post_init__(self):
        if self.weight_low is None and self.high_fraction != 0.25:
            raise ValueError("high_fraction applies to oscillating guidance only: set weight_low too")


@dataclass
class CascadeConfig:
    """A super-resolution stage's input: the video downsampled by these factors, encoded, and
    upsampled back to the target latent shape; noised during training (conditioning
    augmentation) at a log-SNR drawn uniformly from `aug_logsnr`, which the backbone is told."""

    spatial: int = param(1, ge=1)
    temporal: int = param(1, ge=1)
    aug_logsnr: tuple[float, float] = (0.0, 10.0)

    def __post_init__(self):
        if self.aug_logsnr[0] > self.aug_logsnr[1]:
            raise ValueError(f"cascade.aug_logsnr must be (low, high), got {self.aug_logsnr}")
