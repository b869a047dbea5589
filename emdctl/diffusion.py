"""Diffusion math in EDM's notation (Karras et al. 2022).

Data x, noise level sigma, noisy x_s = x + sigma n, denoiser D(x_s; sigma) ~ E[x | x_s],
score s(x_s; sigma) = (D(x_s; sigma) - x_s) / sigma^2. A VP model with x_t = a_t x + s_t n maps to
this by sigma = s_t / a_t and x_s = x_t / a_t. All of emdctl runs in these coordinates (alpha = 1):
the EMD E-step is invariant under that change of variables (docs/algorithm.md, "Notation").
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------
# Preconditioning coefficients (EDM Table 1). Always computed in float32 or wider.


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of EDM's preconditioning."""
    s2 = sigma.square()
    d2 = sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, making the EDM loss unit-scale."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


# --------------------------------------------------------------------------------------------
# VP <-> EDM


def vp_sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the EDM noise level of a VP marginal."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def vp_alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma.square())


def vp_to_edm(x_t: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, alpha_bar_t) of a VP process -> (x_sigma, sigma) with x_sigma = x_t / sqrt(alpha_bar)."""
    return x_t / alpha_bar.sqrt(), vp_sigma_from_alpha_bar(alpha_bar)


def edm_to_vp(x_sigma: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, sigma) -> (x_t, alpha_bar_t) of the VP process with the same signal-to-noise ratio."""
    alpha_bar = vp_alpha_bar_from_sigma(sigma)
    return x_sigma * alpha_bar.sqrt(), alpha_bar


def linear_beta_alpha_bar(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """alpha_bar_t = prod_{i <= t} (1 - beta_i) for DDPM's linear schedule, in float64."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def log_snr(sigma: torch.Tensor | float):
    """lambda = -2 ln sigma (EDM, alpha = 1): the paper's parametrization of sigma*."""
    return -2 * torch.log(sigma) if isinstance(sigma, torch.Tensor) else -2 * math.log(sigma)


# --------------------------------------------------------------------------------------------
# Noise-level distributions


def sample_sigma(levels, u: torch.Tensor) -> torch.Tensor:
    """Map draws u ~ N(0, 1) (lognormal) or u ~ U(0, 1) (others) to noise levels.

    Taking the draws as input keeps every random number under the caller's seeding discipline.
    `levels` is a `recipe.NoiseLevels`.
    """
    lo, hi = levels.sigma_min, levels.sigma_max
    if levels.dist == "lognormal":
        sigma = (u * levels.p_std + levels.p_mean).exp()
    elif levels.dist == "loguniform":
        sigma = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp()
    elif levels.dist == "karras":
        r = 1 / levels.rho
        sigma = (hi**r + u * (lo**r - hi**r)) ** levels.rho
    else:  # pragma: no cover - the recipe schema rejects other names
        raise ValueError(levels.dist)
    return sigma.clamp(lo, hi)


def sigma_uses_normal_draws(levels) -> bool:
    return levels.dist == "lognormal"


def karras_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype=torch.float64):
    """EDM's time steps sigma_0 > ... > sigma_{N-1}, then 0 appended."""
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=dtype)
    else:
        i = torch.arange(num_steps, dtype=dtype)
        r = 1 / rho
        t = (sigma_max**r + i / (num_steps - 1) * (sigma_min**r - sigma_max**r)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=dtype)])


def few_step_levels(steps: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> list[float]:
    """The input levels sigma_max = sigma_k > ... > sigma_1 of a k-step sampler: EDM's schedule on
    k + 1 points from sigma_max to sigma_min with the last dropped, since the final step denoises to
    0 anyway (so no step is spent at sigma_min: 2 steps from 80 take the second at 2.5)."""
    levels = karras_schedule(steps + 1, sigma_min, sigma_max, rho)[:steps].tolist()
    return [float(sigma_max)] + levels[1:]  # the power rounds sigma_max itself by an ulp or so


def posterior_sample(x: torch.Tensor, z_t: torch.Tensor, sigma_t, sigma_s, noise: torch.Tensor) -> torch.Tensor:
    """z_s ~ q(z_s | z_t, x) of the variance-exploding forward process z = x + sigma n, for s <= t
    (per-row tensors or floats): mean x + (s^2 / t^2)(z_t - x), variance s^2 (1 - s^2 / t^2)."""

    def rows(v):
        return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) if isinstance(v, torch.Tensor) else v

    s, t = rows(sigma_s), rows(sigma_t)
    r = s * s / (t * t)
    keep = (1 - r).clamp_min(0).sqrt() if isinstance(r, torch.Tensor) else math.sqrt(max(1 - r, 0.0))
    return x + r * (z_t - x) + s * keep * noise


# --------------------------------------------------------------------------------------------
# Generator-loss weightings w(sigma) for EMD and Diff-Instruct


def generator_weight(
    kind: str, sigma: torch.Tensor, x0: torch.Tensor | None = None, d_teacher: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample w(sigma) for the generator loss, shape [N].

    'sigma2': w = sigma^2, which turns the Diff-Instruct direction alpha * Delta into
    D_teacher - D_fake, O(1) per pixel at every noise level. 'uniform': w = 1.
    'dmd': DMD's adaptive normalization w = sigma^2 / mean|x0 - D_teacher(x_sigma)| per sample
    (needs the generator output x0 and the teacher's denoised estimate).
    """
    if kind == "sigma2":
        return sigma.square()
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "dmd":
        if x0 is None or d_teacher is None:
            raise ValueError("the 'dmd' weighting needs x0 and the teacher's denoised estimate")
        scale = (x0 - d_teacher).abs().flatten(1).mean(1).clamp_min(1e-6)
        return sigma.square() / scale
    raise ValueError(kind)
