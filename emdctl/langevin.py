"""EMD's E-step: K Langevin steps on (eps, z), with noise cancellation (docs/algorithm.md).

x = g(z) + sigma * eps (EDM coordinates, alpha = 1) and Delta(x) = s_teacher(x) - s_fake(x)
= (D_teacher(x) - D_fake(x)) / sigma^2. The target density pi(eps, z) has
    grad_eps log pi = sigma * Delta - eps,    grad_z log pi = J_g(z)^T Delta - z,
and each step is
    eps <- eps + gamma_eps (sigma Delta - eps) + sqrt(2 gamma_eps) xi_eps
    z   <- z   + gamma_z   (J_g^T Delta - z)   + sqrt(2 gamma_z)   xi_z.

Noise cancellation. The M-step needs eps^K - eps^0 - sum_k sqrt(2 gamma) xi^k, which equals the
sum of the drifts, sum_k gamma (sigma Delta^k - eps^k). The ledger accumulates that sum directly:
the same quantity without subtracting O(1) terms from each other. The chain itself keeps its
noise. Switches: `prior_pull` keeps (True) or drops the -gamma * eps term from the ledger (the
chain always keeps it); `cancel_noise_z` gives the M-step z^0 + sum of z-drifts instead of z^K.

The loop has a fixed trip count and no data-dependent Python control flow, so it can be compiled
as a whole (torch.compile) and its per-step update can be fused (emdctl.kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class EStepResult:
    z: torch.Tensor  # generator input for the M-step
    eps_m: torch.Tensor  # the M-step's eps: the ledger (noise cancelled) or eps^K
    eps: torch.Tensor  # the chain's final eps^K
    d_teacher: torch.Tensor | None  # teacher's D at the last chain point (for adaptive weightings)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().square().mean().sqrt()


def e_step(
    generator,
    teacher,
    fake,
    z0: torch.Tensor,
    eps0: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor | None,
    xi_eps: list[torch.Tensor],
    xi_z: list[torch.Tensor] | None,
    steps: int,
    gamma_eps: float,
    gamma_z: float | torch.Tensor = 0.0,
    cancel_noise: bool = True,
    cancel_noise_z: bool = False,
    prior_pull: bool = True,
    fused_update=None,
) -> EStepResult:
    """Run the chain from (eps0, z0) for `steps` steps with the given injected noises.

    `generator`, `teacher`, `fake` map (x or z, [sigma,] labels) to tensors; teacher and fake are
    evaluated without gradients; the generator is differentiated w.r.t. z only (a VJP).
    `gamma_z` may be a per-sample tensor [N] (a per-chain preconditioner).
    `fused_update`, when given, replaces the eager eps update (see emdctl.kernels).
    """
    s = sigma.reshape(-1, *([1] * (eps0.ndim - 1))).to(eps0.dtype)
    z = z0
    eps = eps0.clone() if fused_update is not None else eps0  # the fused kernel updates in place
    ledger = torch.zeros_like(eps0)
    z_ledger = torch.zeros_like(z0) if cancel_noise_z else None
    if isinstance(gamma_z, torch.Tensor):
        move_z = bool((gamma_z > 0).any())
        gamma_z = gamma_z.reshape(-1, *([1] * (z0.ndim - 1))).to(z0.dtype)
        noise_z = (2 * gamma_z).sqrt()
    else:
        move_z = gamma_z > 0
        noise_z = math.sqrt(2 * gamma_z)
    noise_eps = math.sqrt(2 * gamma_eps)
    zero = eps0.new_zeros(())
    drift_sq, delta_sq, zdrift_sq = zero, zero, zero
    d_t = None

    g = None
    if not move_z:
        with torch.no_grad():
            g = generator(z, labels)
    for k in range(steps):
        if move_z:
            with torch.enable_grad():
                z_var = z.detach().requires_grad_(True)
                g_var = generator(z_var, labels)
            g = g_var.detach()
        x = g + s * eps
        with torch.no_grad():
            d_t = teacher(x, sigma, labels)
            d_f = fake(x, sigma, labels)
        if fused_update is not None and not move_z:
            eps, ledger, drift_rms, sdelta_rms = fused_update(d_t, d_f, eps, ledger, sigma, k)
            drift_sq = drift_sq + drift_rms.square()
            delta_sq = delta_sq + sdelta_rms.square()
            continue
        delta = (d_t - d_f) / s.square()
        sdelta = s * delta
        drift = gamma_eps * (sdelta - eps)
        ledger = ledger + (drift if prior_pull else gamma_eps * sdelta)
        if move_z:
            (jtd,) = torch.autograd.grad(g_var, z_var, grad_outputs=delta.to(g_var.dtype))
            z_drift = gamma_z * (jtd - z)
            if z_ledger is not None:
                z_ledger = z_ledger + (z_drift if prior_pull else gamma_z * jtd)
            z = z + z_drift + noise_z * xi_z[k]
            zdrift_sq = zdrift_sq + _rms(z_drift).square()
        eps = eps + drift + noise_eps * xi_eps[k]
        drift_sq = drift_sq + _rms(drift).square()
        delta_sq = delta_sq + _rms(sdelta).square()

    n = max(steps, 1)
    stats = {
        "langevin/drift_rms": (drift_sq / n).sqrt(),
        "langevin/noise_rms": eps0.new_tensor(noise_eps if steps else 0.0),
        "langevin/sigma_delta_rms": (delta_sq / n).sqrt(),
        "langevin/eps_rms": _rms(eps),
    }
    if move_z:
        stats["langevin/z_drift_rms"] = (zdrift_sq / n).sqrt()
        stats["langevin/z_rms"] = _rms(z)
    z_m = z0 + z_ledger if z_ledger is not None else z
    eps_m = ledger if cancel_noise else eps
    stats["langevin/eps_m_rms"] = _rms(eps_m)
    return EStepResult(z=z_m.detach(), eps_m=eps_m.detach(), eps=eps.detach(), d_teacher=d_t, stats=stats)
