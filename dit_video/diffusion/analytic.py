"""Data distributions whose exact denoiser E[x | z_t] is known in closed form.

For a Gaussian mixture sum_k pi_k N(mu_k, S_k), the noisy marginal at level t is the mixture
sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), and

    E[x | z] = sum_k r_k(z) (mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (z - alpha mu_k)),

with r_k(z) the posterior probability of component k given z. A single Gaussian is the
one-component case. These are the ground truth the samplers, guidance and distillation are
tested against, and what the toy demo draws.
"""

from __future__ import annotations

import math

import torch

from .parameterization import alpha_sigma


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions; computations in float64.

    Inputs of any shape [B, ...] whose trailing dimensions hold D numbers are accepted, so a
    "video" [B, C, T, H, W] with C*T*H*W = D works the same as a vector [B, D].
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, d, d):
            raise ValueError(f"need weights [K], means [K, D], covs [K, D, D]; got {tuple(self.weights.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or not math.isclose(self.weights.sum().item(), 1.0, rel_tol=1e-9):
            raise ValueError("mixture weights must be non-negative and sum to 1")
        self.chol = torch.linalg.cholesky(self.covs)  # also checks the covariances are positive definite

    @classmethod
    def gaussian(cls, mean, cov) -> "GaussianMixture":
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls([1.0], mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - self.mean[:, None] * self.mean[None, :]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws [n, D] (float64) and the component index [n] of each."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[component] + torch.einsum("nij,nj->ni", self.chol[component], noise)
        return x, component

    def _components(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """For each z [B, D] at its own (alpha, sigma) [B]: log pi_k N(z; alpha mu_k, alpha^2 S_k +
        sigma^2 I) [B, K] and E[x | z, k] [B, K, D]. Work is done once per distinct noise level
        (a sampler's whole batch shares one)."""
        logits = z.new_empty(z.shape[0], len(self.weights))
        cond_mean = z.new_empty(z.shape[0], *self.means.shape)
        levels = torch.stack([alpha, sigma], 1)
        if (levels == levels[0]).all():
            levels, which = levels[:1], torch.zeros(len(levels), dtype=torch.long)
        else:
            levels, which = torch.unique(levels, dim=0, return_inverse=True)
        for u, (a, s) in enumerate(levels):
            rows = slice(None) if len(levels) == 1 else which == u
            chol = torch.linalg.cholesky(a**2 * self.covs + s**2 * torch.eye(self.dim, dtype=torch.float64))
            precision = torch.cholesky_inverse(chol)  # [K, D, D]
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            diff = z[rows, None, :] - a * self.means  # [b, K, D]
            white = torch.einsum("kij,bkj->bki", precision, diff)
            quad = (diff * white).sum(-1)
            logits[rows] = torch.log(self.weights) - 0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))
            cond_mean[rows] = self.means + a * torch.einsum("kij,bkj->bki", self.covs, white)
        return logits, cond_mean

    def _flat(self, z: torch.Tensor, logsnr: torch.Tensor):
        flat = z.reshape(z.shape[0], -1).double().cpu()
        if flat.shape[1] != self.dim:
            raise ValueError(f"this distribution is {self.dim}-dimensional; got z of shape {tuple(z.shape)}")
        alpha, sigma = alpha_sigma(torch.as_tensor(logsnr).double().cpu().expand(z.shape[0]))
        return flat, alpha, sigma

    def denoiser(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """The exact E[x | z_t = z] at log-SNR `logsnr` ([B] or 0-d), in z's shape, dtype and device
        (computed in float64 on the CPU)."""
        logits, cond_mean = self._components(*self._flat(z, logsnr))
        x = torch.einsum("bk,bki->bi", torch.softmax(logits, dim=1), cond_mean)
        return x.to(device=z.device, dtype=z.dtype).reshape(z.shape)

    def log_prob_noisy(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """log q(z_t = z) of the noisy marginal at `logsnr`, [B]."""
        return torch.logsumexp(self._components(*self._flat(z, logsnr))[0], dim=1)

    def component_of(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each data point x [B, D] (for checking mixture weights)."""
        flat = x.reshape(x.shape[0], -1).double().cpu()
        ones = torch.ones(flat.shape[0], dtype=torch.float64)
        return self._components(flat, ones, torch.zeros_like(ones))[0].argmax(dim=1)

    def restrict(self, components) -> "GaussianMixture":
        """The mixture of the given components only, reweighted: a class-conditional distribution."""
        idx = torch.as_tensor(components, dtype=torch.long)
        w = self.weights[idx]
        return GaussianMixture(w / w.sum(), self.means[idx], self.covs[idx])
