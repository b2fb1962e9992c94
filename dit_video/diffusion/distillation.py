"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): the target that teaches an
N-step student to do in one DDIM step what its teacher does in two, and the loss on it.

The student samples with `sample(..., sampler="ddim", steps=N)`, on the grid uniform in t of the
schedule. At its level t = i/N the teacher makes two DDIM (eta = 0) steps from z_t,
t -> t' = t - 1/(2N) -> t'' = t - 1/N (the levels of its own 2N-step grid, nothing clipped), and
the student regresses on the x that takes one DDIM step from z_t straight to the teacher's z_t'':

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).

At the last level (t = 1/N, t'' = 0) `sample` returns x_hat instead of stepping, so what the
student must output there is what the teacher's sampler returns: its x_hat at t' after one step.
The student's samples then equal the teacher's wherever it fits its targets. The loss is the
"truncated SNR" one, max(SNR, 1) ||x_tilde - x_hat||^2, written in the student's own target space.
Classifier-free guidance is distilled in by giving the teacher denoiser guided with the weights
that the student gets as an input; the functions here see only denoisers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .losses import loss_weight
from .parameterization import Denoiser, Prediction, alpha_sigma_like, convert, expand_like
from .samplers import ddim_step
from .schedule import CosineSchedule


class DistillationLevels(NamedTuple):
    """Per sample, the student's level and the teacher's two steps from it, as `[B]` log-SNRs."""

    t: torch.Tensor  # the student's level, t = i/N
    mid: torch.Tensor  # t' = t - 1/(2N), where the teacher's first step lands
    next: torch.Tensor  # t'' = t - 1/N, where the student's step must land
    last: torch.Tensor  # [B] bool: t = 1/N, the level at which the sampler returns x_hat


def distillation_levels(steps: int, batch: int, schedule: CosineSchedule | None = None,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> DistillationLevels:
    """Training levels of an N = `steps` student: i uniform in {1, ..., N} per sample, t = i/N.

    The levels are read off `schedule.grid(N)` and `schedule.grid(2N)`, the very values the
    student's and the teacher's samplers use, so no level is trained that is never sampled.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"student steps must be an int >= 1, got {steps!r}")
    schedule = schedule or CosineSchedule()
    draw_on = generator.device if generator is not None else device
    j = torch.randint(0, steps, (batch,), generator=generator, device=draw_on).to(device)  # 0 is t = 1
    student = schedule.grid(steps, device=device, dtype=dtype)
    teacher = schedule.grid(2 * steps, device=device, dtype=dtype)
    return DistillationLevels(student[j], teacher[2 * j + 1], student[j + 1], j == steps - 1)


def ddim_inverse(z_t: torch.Tensor, z_s: torch.Tensor, logsnr_t: torch.Tensor,
                 logsnr_s: torch.Tensor) -> torch.Tensor:
    """The x whose DDIM step (eta = 0) goes from z_t at logsnr_t to exactly z_s at logsnr_s:

        x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

    the inverse of ddim_step in x_hat (the denominator is sigma_s (sqrt(SNR_s) - sqrt(SNR_t)) > 0
    for s less noisy than t).
    """
    alpha_t, sigma_t = alpha_sigma_like(logsnr_t, z_t)
    alpha_s, sigma_s = alpha_sigma_like(logsnr_s, z_t)
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def teacher_steps(teacher: Denoiser, z: torch.Tensor,
                  levels: DistillationLevels) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's two DDIM steps from z at levels.t: (z_t'', x_hat at t'). The teacher is a
    denoiser D(z, logsnr) -> x_hat (guided or conditioned as the caller wraps it)."""
    z_mid = ddim_step(z, teacher(z, levels.t), levels.t, levels.mid)
    x_mid = teacher(z_mid, levels.mid)
    return ddim_step(z_mid, x_mid, levels.mid, levels.next), x_mid


def distillation_target(teacher: Denoiser, z: torch.Tensor, levels: DistillationLevels) -> torch.Tensor:
    """x_tilde, the student's target at z_t (see the module docstring): the x of one DDIM step
    onto the teacher's z_t'', and at the last level the teacher's final x_hat (at t')."""
    z_next, x_mid = teacher_steps(teacher, z, levels)
    x = ddim_inverse(z, z_next, levels.t, levels.next)
    return torch.where(expand_like(levels.last, x), x_mid.to(x.dtype), x)


def distillation_loss(output: torch.Tensor, z: torch.Tensor, target: torch.Tensor, logsnr: torch.Tensor,
                      prediction: Prediction = "v") -> torch.Tensor:
    """Per-sample loss `[B]`: max(SNR, 1) ||target - x_hat||^2 (mean over the non-batch dims) of a
    student `output` of kind `prediction` made at z, computed in that space: the target is
    converted to it and the MSE weighted by `loss_weight(..., "truncated_snr")`."""
    dtype = torch.promote_types(torch.promote_types(output.dtype, target.dtype), torch.float32)
    goal = convert(target.to(dtype), z.to(dtype), logsnr, "x", prediction)
    mse = (output.to(dtype) - goal.to(dtype)).square().flatten(1).mean(dim=1)
    return mse * loss_weight(logsnr, prediction, "truncated_snr").to(device=mse.device, dtype=dtype)
