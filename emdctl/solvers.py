"""Teacher solvers (the many-step samplers people compare against), in EDM coordinates. Not to be
confused with emdctl.sampling (`emdctl sample`: writing samples at scale) or the generator's few-step
states (emdctl.generator.few_step_states).

* `edm_sampler`: EDM's Algorithm 2 (Heun, 2nd order) with optional stochastic churn, or Euler.
* `ddpm_sampler`: ancestral DDPM for discrete-time VP models, on the model's own timestep grid
  (all of it, or an evenly strided subset), with DDPM's sigma_t^2 = beta_t.

Randomness comes from a `rng.PerSeedRandom`, so each image is a function of its seed alone.
"""

from __future__ import annotations

import torch

from . import diffusion
from .networks.precond import Denoiser, DiscreteVPPrecond
from .rng import PerSeedRandom


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def edm_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    labels: torch.Tensor | None = None,
    rng: PerSeedRandom | None = None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Integrate the probability-flow ODE (or the churned SDE) from sigma_max to 0."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = diffusion.karras_schedule(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64)
    t_steps = torch.cat([net.round_sigma(t_steps[:-1]).to(torch.float64), t_steps[-1:]]).to(latents.device, dtype)
    x_next = latents.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        gamma = min(S_churn / num_steps, 2**0.5 - 1) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = net.round_sigma(t_cur + gamma * t_cur).to(dtype)
        if gamma > 0:
            if rng is None:
                raise ValueError("stochastic sampling (S_churn > 0) needs per-seed random numbers")
            noise = rng.randn(tuple(latents.shape[1:])).to(latents.device, dtype)
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
        else:
            x_hat = x_cur
        d_cur = (x_hat - net(x_hat, t_hat.expand(len(x_hat)), labels).to(dtype)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next.expand(len(x_next)), labels).to(dtype)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def ddpm_sampler(
    net: DiscreteVPPrecond,
    latents: torch.Tensor,
    labels: torch.Tensor | None = None,
    rng: PerSeedRandom | None = None,
    num_steps: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Ancestral DDPM: x_{s} = (x_t - beta/sqrt(1 - abar_t) eps) / sqrt(alpha) + sqrt(beta) z, with
    alpha = abar_t / abar_s over consecutive grid points t > s (the full grid when num_steps is None)."""
    if not isinstance(net, DiscreteVPPrecond):
        raise ValueError("the DDPM sampler needs a discrete-time VP teacher")
    if rng is None:
        raise ValueError("the DDPM sampler needs per-seed random numbers")
    T = net.timesteps
    n = T if num_steps is None else int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {n}")
    ts = torch.linspace(T - 1, 0, n).round().long().tolist()
    abar = net.alpha_bar.to(latents.device, dtype)
    sig = net.grid.to(latents.device, dtype)
    shape = tuple(latents.shape[1:])
    x_vp = latents.to(dtype)  # x_T ~ N(0, I) in the VP coordinates
    for i, t in enumerate(ts):
        s_abar = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=dtype, device=latents.device)
        a_t = abar[t].sqrt()
        x_edm = x_vp / a_t
        d = net(x_edm, sig[t].expand(len(x_edm)), labels).to(dtype)
        eps = (x_edm - d) / sig[t]
        alpha = abar[t] / s_abar
        beta = 1 - alpha
        x_vp = (x_vp - beta / (1 - abar[t]).sqrt() * eps) / alpha.sqrt()
        if i + 1 < len(ts):
            x_vp = x_vp + beta.sqrt() * rng.randn(shape).to(latents.device, dtype)
    return x_vp
