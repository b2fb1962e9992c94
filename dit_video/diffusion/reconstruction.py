"""Reconstruction guidance (VDM, Ho et al. 2022, section 3.1): sample x_b given known data x_a.

Split the data as x = [x_a, x_b], with x_a known (e.g. the last frames of the previous chunk)
and x_b to generate. The sampler needs E[x_b | z_t, x_a]; the unconditional denoiser only gives
x_hat = E[x | z_t]. Two wrappers bridge the gap, each returning a denoiser:

- replacement: z_a is replaced at every call by a fresh draw from q(z_a,t | x_a). The model then
  sees x_a only through its noisy copy, which says little at high noise, so x_b drifts away from
  p(x_b | x_a) (VDM's "replacement method"; biased even with a perfect model).
- guided: replacement plus a gradient step that pulls the model's x_a_hat toward x_a,

      x_b_tilde = x_b_hat - (w alpha_t / 2) grad_{z_b} ||x_a - x_a_hat(z_t)||^2.

  By Tweedie, d x_hat / d z = (alpha / sigma^2) Cov[x | z_t], so this is
  x_b_hat + w (alpha^2 / sigma^2) Cov[x_b, x_a | z_t] (x_a - x_a_hat), while the exact
  E[x_b | z_t, x_a] (for Gaussian data) is x_b_hat + Cov[x_b, x_a | z_t] Cov[x_a | z_t]^-1 (x_a - x_a_hat).
  The guidance is therefore exact where Cov[x_a | z_t] = sigma^2 / (w alpha^2) I. For Gaussian
  data Cov[x | z_t] = (S^-1 + SNR I)^-1 <= I / SNR, so the ideal weight is >= 1 at every level,
  tends to 1 as the noise vanishes and grows without bound at high noise: hence w_r > 1 helps.

`observation_guidance` is the same correction when x_a is a differentiable function of x rather
than a set of entries (VDM's super-resolution, x_a_hat = downsample(x_hat), or given pixel
frames seen through a VAE decoder): z has no known entries to replace, the gradient acts on all of z.

The gradient goes through the denoiser by autograd (enabled here, since samplers run under
no_grad), so a guided call costs about a forward and a backward pass and holds the activations.
The error is summed over the batch: its gradient is per sample as long as the denoiser treats
samples independently (true of the backbones; not of a batch-norm network in training mode).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .guidance import Weight
from .parameterization import Denoiser, alpha_sigma_like, expand_like

Method = Literal["guided", "replacement"]
METHODS: tuple[str, ...] = ("guided", "replacement")


def reconstruction_guidance(denoiser: Denoiser, known: torch.Tensor, mask: torch.Tensor, weight: Weight = 1.0,
                            *, method: Method = "guided", generator: torch.Generator | None = None) -> Denoiser:
    """The denoiser D~(z, logsnr) of x = [x_a, x_b] given x_a, by VDM's reconstruction guidance.

    known: x_a, a tensor shaped like z ([B, ...] or [1, ...] for the whole batch) holding the
        known values where `mask` is True; its other entries are ignored.
    mask: bool, broadcastable to `known` with the same number of dims (e.g. [1, 1, T, 1, 1] for
        whole frames of a [B, C, T, H, W] video); True marks x_a. Each sample needs both kinds.
    weight: w_r >= 0, a number, a [B] tensor or a function of the [B] log-SNR (`guidance.Weight`);
        1 is the plain Tweedie approximation, w = 0 is the replacement method.
    method: "guided" (the gradient correction) or "replacement" (without it).
    generator: the source of the noise of q(z_a,t | x_a), drawn in float32 on its device, so one
        seed gives one result in every dtype.

    Each call draws z_a = alpha x_a + sigma eps afresh (the predictor-corrector sampler's
    corrector calls draw their own), keeps z_b, and returns x_hat with the known entries set to x_a.
    Extending a video [B, C, T, H, W] by continuing its last k latent frames:

        mask = torch.zeros(1, 1, T, 1, 1, dtype=torch.bool); mask[:, :, :k] = True
        known = torch.zeros(1, C, T, H, W); known[:, :, :k] = previous[:, :, -k:]
        x = sample(reconstruction_guidance(denoiser, known, mask, 2.0), noise, sampler="pc")
    """
    if method not in METHODS:
        raise ValueError(f"unknown reconstruction method {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(known, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise ValueError("known and mask must be tensors")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = known), got {mask.dtype}")
    if known.ndim < 2 or mask.ndim != known.ndim:
        raise ValueError(f"known must be a batch [B, ...] and mask have as many dims; got shapes "
                         f"{tuple(known.shape)} and {tuple(mask.shape)}")
    try:
        full = mask.expand(known.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to known's "
                         f"shape {tuple(known.shape)}") from None
    per_sample = full.flatten(1)
    if not per_sample.any(1).all():
        raise ValueError("mask marks nothing as known (in some sample): there is nothing to guide on")
    if per_sample.all(1).any():
        raise ValueError("mask marks everything as known (in some sample): there is nothing to generate")
    if not torch.isfinite(torch.where(full, known, 0)).all():
        raise ValueError("known contains NaN or infinite values where mask is True")
    _check_weight(weight)
    known = torch.where(full, known, 0).detach()  # the ignored entries can hold anything, even NaN

    def guided(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        _check_batch("known", known, z)
        x_a, m = known.to(z.device), mask.to(z.device)
        alpha, sigma = alpha_sigma_like(logsnr, z)
        device = generator.device if generator is not None else z.device
        eps = torch.randn(z.shape, generator=generator, device=device).to(device=z.device, dtype=alpha.dtype)
        z = torch.where(m, alpha * x_a + sigma * eps, z).to(z.dtype)
        w = _weight_at(weight, logsnr, z) if method == "guided" else 0.0
        if method == "replacement" or bool((torch.as_tensor(w) == 0).all()):
            x_hat = denoiser(z, logsnr)
        else:
            x_hat, grad = _error_gradient(denoiser, z, logsnr, lambda x: torch.where(m, x_a - x, 0), "known")
            # Only the z_b entries of the gradient are used; z_a is a draw, not a variable.
            x_hat = x_hat - (expand_like(w, z) * alpha / 2) * grad.to(alpha.dtype)
        return torch.where(m, x_a.to(x_hat.dtype), x_hat).to(z.dtype)

    return guided


def observation_guidance(denoiser: Denoiser, observed: torch.Tensor,
                         observe: Callable[[torch.Tensor], torch.Tensor], weight: Weight = 1.0) -> Denoiser:
    """x_tilde = x_hat - (w alpha / 2) grad_z ||observed - observe(x_hat(z))||^2, per sample.

    observed: the known data, [B, ...] or [1, ...] for the whole batch.
    observe: a differentiable map from x_hat [B, ...] to the observation's shape: a downsampling
        for super-resolution, or a VAE decode then frame selection to guide on given pixel frames.
    weight: w >= 0 as in `reconstruction_guidance`; 0 returns the denoiser's x_hat.

    For a linear observe(x) = A x and Gaussian data this is x_hat + w SNR Cov[x | z_t] A^T
    (observed - A x_hat); the exact E[x | z_t, A x = observed] has (A Cov A^T)^-1 in place of
    w SNR. So the right weight depends on the observation's units: observe scaled by c acts as
    the weight scaled by c^2 (pairwise averages, A A^T = I / 2, need twice the weight of picking
    entries). Nothing is replaced and the output need not reproduce `observed` exactly. Guided
    wrappers do not nest (the inner one's gradient is not differentiated): put a replacement
    wrapper inside this one if both are wanted.
    """
    if not isinstance(observed, torch.Tensor) or observed.ndim < 1:
        raise ValueError("observed must be a batch tensor [B, ...]")
    if not torch.isfinite(observed).all():
        raise ValueError("observed contains NaN or infinite values")
    if not callable(observe):
        raise ValueError("observe must be a callable mapping x_hat to the observation")
    _check_weight(weight)
    observed = observed.detach()

    def guided(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        w = _weight_at(weight, logsnr, z)
        if bool((torch.as_tensor(w) == 0).all()):
            return denoiser(z, logsnr)
        y = observed.to(z.device)

        def residual(x: torch.Tensor) -> torch.Tensor:
            y_hat = observe(x)
            if y_hat.shape[1:] != y.shape[1:] or y.shape[0] not in (1, y_hat.shape[0]):
                raise ValueError(f"observe(x_hat) has shape {tuple(y_hat.shape)}, which does not match "
                                 f"observed {tuple(y.shape)}")
            return y - y_hat

        x_hat, grad = _error_gradient(denoiser, z, logsnr, residual, "observed")
        alpha, _ = alpha_sigma_like(logsnr, z)
        return (x_hat - (expand_like(w, z) * alpha / 2) * grad.to(alpha.dtype)).to(z.dtype)

    return guided


def _error_gradient(denoiser: Denoiser, z: torch.Tensor, logsnr: torch.Tensor,
                    residual: Callable[[torch.Tensor], torch.Tensor], what: str):
    """x_hat = D(z) and grad_z sum_batch ||residual(x_hat)||^2 (per sample: samples are independent),
    both detached, x_hat in at least float32 and the error summed in at least float32."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("guided reconstruction needs autograd through the denoiser; it cannot run under "
                           "torch.inference_mode() (use torch.no_grad(), or method='replacement')")
    work = torch.promote_types(z.dtype, torch.float32)
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        x_hat = denoiser(z, logsnr)
        if not x_hat.requires_grad:
            raise RuntimeError(f"the denoiser's output does not depend differentiably on z (is it detached, or "
                               f"itself a guided wrapper?), so the guidance toward {what} has no gradient")
        error = residual(x_hat.to(work)).to(work).square().sum()
        if not error.requires_grad:
            raise RuntimeError(f"the error toward {what} does not depend differentiably on x_hat (does the "
                               f"observation run under torch.no_grad or detach?)")
        (grad,) = torch.autograd.grad(error, z)
    return x_hat.detach().to(work), grad


def _check_weight(weight: Weight) -> None:
    if callable(weight):
        return  # checked at each call, on the value it gives
    w = torch.as_tensor(weight)
    if w.ndim > 1 or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"reconstruction guidance weight must be a finite number >= 0 or a [B] tensor of them, "
                         f"got {weight!r}")


def _weight_at(weight: Weight, logsnr: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The weight at this call's levels, on z's device, checked (a callable's value is known only now)."""
    w = weight(logsnr) if callable(weight) else weight
    _check_weight(w)
    w = torch.as_tensor(w, device=z.device)
    if w.ndim == 1 and w.shape[0] not in (1, z.shape[0]):
        raise ValueError(f"a per-sample weight needs {z.shape[0]} entries, got {w.shape[0]}")
    return w


def _check_batch(name: str, ref: torch.Tensor, z: torch.Tensor) -> None:
    if ref.shape[1:] != z.shape[1:] or ref.shape[0] not in (1, z.shape[0]):
        raise ValueError(f"{name} has shape {tuple(ref.shape)} but z has {tuple(z.shape)}; they must match "
                         f"(the batch may be 1)")
