"""The diffusion math, as plain functions over tensors (no nn.Module).

Noise levels are log-SNR `[B]` tensors everywhere; a denoiser is any callable
`D(z, logsnr) -> x_hat`. Formulas: docs/math.md, each with its source and its test.
"""

from .analytic import GaussianMixture
from .cascade import augment_condition, downsample_video, sample_augmentation_logsnr, upsample_latent
from .config import CascadeConfig, DiffusionConfig, GuidanceConfig, SamplerConfig
from .distillation import (DistillationLevels, ddim_inverse, distillation_levels, distillation_loss,
                           distillation_target, teacher_steps)
from .guidance import (OscillatingWeight, classifier_free_guidance, dynamic_threshold, dynamic_thresholding,
                       guidance_rescale, guided_denoiser)
from .losses import WEIGHTINGS, diffusion_loss, loss_weight, training_loss, x_space_weight
from .parameterization import (PREDICTIONS, Denoiser, alpha_sigma, convert, diffuse, model_denoiser, posterior,
                               training_target, transition)
from .reconstruction import observation_guidance, reconstruction_guidance
from .samplers import SAMPLERS, ancestral_step, ddim_step, langevin_step, sample
from .schedule import CosineSchedule

__all__ = [
    "CosineSchedule", "alpha_sigma", "diffuse", "convert", "training_target", "posterior", "transition",
    "model_denoiser", "Denoiser", "PREDICTIONS",
    "diffusion_loss", "training_loss", "loss_weight", "x_space_weight", "WEIGHTINGS",
    "sample", "ddim_step", "ancestral_step", "langevin_step", "SAMPLERS",
    "classifier_free_guidance", "OscillatingWeight", "guidance_rescale", "dynamic_threshold",
    "dynamic_thresholding", "guided_denoiser",
    "DiffusionConfig", "SamplerConfig", "GuidanceConfig", "CascadeConfig", "GaussianMixture",
    "downsample_video", "upsample_latent", "augment_condition", "sample_augmentation_logsnr",
    "distillation_levels", "distillation_target", "distillation_loss", "teacher_steps", "ddim_inverse",
    "DistillationLevels",
    "reconstruction_guidance", "observation_guidance",
]
