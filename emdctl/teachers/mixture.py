"""Analytic isotropic Gaussian mixtures: exact density, score and denoiser at every noise level.

p_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I), and
D(x; sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
with r_k the posterior responsibilities. Everything is exact, in any dimension: the reference for
correctness of samplers, of EMD's E-step, and of every mode metric.
"""

from __future__ import annotations

import math

import torch

from ..networks.precond import Denoiser

PRESETS = {
    # Eight modes on a ring of radius 2, unequal weights (the mode-coverage benchmark).
    "ring8-unequal": dict(
        weights=[0.26, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.04],
        angles=8,
        radius=2.0,
        scale=0.1,
    ),
    "ring8": dict(weights=[1 / 8] * 8, angles=8, radius=2.0, scale=0.1),
    # The 5x5 grid of the mode-collapse literature (spacing 2), weights spread over a factor of 8.
    "grid25-unequal": dict(
        weights=[1, 8, 2, 5, 3, 6, 1, 4, 7, 2, 3, 5, 8, 1, 6, 2, 7, 3, 4, 1, 5, 2, 6, 8, 3],
        grid=5,
        spacing=2.0,
        scale=0.1,
    ),
}


def preset_mixture(name: str) -> dict:
    p = PRESETS[name]
    if "grid" in p:
        k, h = p["grid"], p["spacing"]
        offs = [(i - (k - 1) / 2) * h for i in range(k)]
        means = [[x, y] for x in offs for y in offs]
        return dict(weights=list(p["weights"]), means=means, scales=[p["scale"]] * (k * k))
    k = p["angles"]
    means = [
        [p["radius"] * math.cos(2 * math.pi * i / k), p["radius"] * math.sin(2 * math.pi * i / k)] for i in range(k)
    ]
    return dict(weights=list(p["weights"]), means=means, scales=[p["scale"]] * k)


class GaussianMixture:
    def __init__(self, weights, means, scales, dtype=torch.float64):
        w = torch.as_tensor(weights, dtype=dtype)
        self.weights = w / w.sum()
        self.means = torch.as_tensor(means, dtype=dtype)
        self.scales = torch.as_tensor(scales, dtype=dtype)
        self.dim = self.means.shape[1]

    @property
    def num_components(self) -> int:
        return len(self.weights)

    def to_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "scales": self.scales.tolist()}

    def _params(self, x):
        return (self.weights.to(x), self.means.to(x), self.scales.to(x))

    def component_log_probs(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I), shape [N, K]."""
        w, mu, s = self._params(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        var = s.square()[None, :] + sigma.square()  # [N or 1, K]
        d2 = (x[:, None, :] - mu[None]).square().sum(-1)  # [N, K]
        return w.log()[None] - 0.5 * d2 / var - 0.5 * self.dim * (2 * math.pi * var).log()

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        return torch.logsumexp(self.component_log_probs(x, sigma), dim=1)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        return torch.softmax(self.component_log_probs(x, sigma), dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _, mu, s = self._params(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        r = self.responsibilities(x, sigma)  # [N, K]
        shrink = s.square()[None, :] / (s.square()[None, :] + sigma.square())  # [N, K]
        post = mu[None] + shrink[..., None] * (x[:, None, :] - mu[None])  # [N, K, D]
        return (r[..., None] * post).sum(1)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        return (self.denoise(x, sigma) - x) / sigma.square()

    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        std = (self.scales[k].square() + sigma**2).sqrt()[:, None]
        return self.means[k] + std * noise

    def transform(self, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Samples as a function of given random numbers: u [N] uniform on [0, 1) picks the
        component (inverse CDF of the weights), noise [N, D] standard normal; in noise's dtype."""
        w, mu, s = (t.to(noise) for t in self._params(noise))
        k = torch.searchsorted(w.cumsum(0), u.to(noise)).clamp_max(len(w) - 1)
        return mu[k] + s[k, None] * noise

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self, sigma: float = 0.0) -> torch.Tensor:
        m = self.mean()
        eye = torch.eye(self.dim, dtype=self.means.dtype)
        second = sum(
            w * (torch.outer(mu, mu) + (s**2 + sigma**2) * eye)
            for w, mu, s in zip(self.weights, self.means, self.scales, strict=True)
        )
        return second - torch.outer(m, m)

    def data_std(self) -> float:
        return float(self.covariance().diagonal().mean().sqrt())


class MixtureDenoiser(Denoiser):
    """The exact mixture denoiser as a (parameter-free) Denoiser module."""

    precond = "mixture"

    def __init__(self, mixture: GaussianMixture, sigma_min: float = 1e-4, sigma_max: float = 1e4):
        super().__init__((mixture.dim,), 0, sigma_min, sigma_max, mixture.data_std())
        self.mixture = mixture

    def precond_kwargs(self):
        return self.mixture.to_dict()

    def _denoise(self, x, sigma, labels):
        # float64 inside: the responsibilities are a softmax over squared distances.
        return self.mixture.denoise(x.double(), sigma.double()).to(x.dtype)
