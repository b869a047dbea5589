"""Preconditioning: turns a raw network F into an EDM-form denoiser D(x; sigma, labels).

Architecture and preconditioning are separate (as in NVlabs/edm): any network can sit inside any
preconditioner. Every denoiser takes x in EDM coordinates (x = data + sigma * n, alpha = 1) and
returns D in float32; the coefficients are computed in float32 (or float64 when x is float64),
and only the inner network runs under the precision policy's autocast.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import diffusion


class Denoiser(nn.Module):
    """Base class. Subclasses define `_denoise`; the network attribute name matches the checkpoints."""

    precond: str = "?"

    def __init__(self, img_shape, label_dim: int, sigma_min: float, sigma_max: float, sigma_data: float):
        super().__init__()
        self.img_shape = tuple(int(s) for s in img_shape)
        self.label_dim = int(label_dim)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.compute_dtype = torch.float32  # set by emdctl.precision.apply_policy
        self.channels_last = False
        self.arch: dict = {}

    # -- interface -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None):
        # float64 only end to end (float64 input and weights: exactness tests); otherwise float32, as
        # EDM's preconditioners do. The result comes back in the caller's dtype (samplers keep their
        # ODE state in float64).
        out_dtype = x.dtype
        param = next(self.parameters(), None)
        wide = x.dtype == torch.float64 and (param is None or param.dtype == torch.float64)
        dtype = torch.float64 if wide else torch.float32
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        if self.label_dim:
            labels = (
                torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=dtype)
                if labels is None
                else labels.to(dtype).reshape(-1, self.label_dim)
            )
        else:
            labels = None
        return self._denoise(x, sigma, labels).to(out_dtype)

    def score(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma
        return (self(x, sigma, labels) - x) / s.square()

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def dsm_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the denoising loss ||D - x0||^2: EDM's lambda(sigma) for EDM
        preconditioning; 1 / sigma^2 (i.e. the plain epsilon loss) for epsilon-predicting models."""
        return 1 / sigma.square()

    @property
    def is_discrete(self) -> bool:
        return False

    def precond_kwargs(self) -> dict:
        return {}

    def config(self) -> dict:
        return {
            "precond": self.precond,
            "precond_kwargs": self.precond_kwargs(),
            "img_shape": list(self.img_shape),
            "label_dim": self.label_dim,
            **self.arch,
        }

    # -- helpers -----------------------------------------------------------------------------
    def _bcast(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.ndim - 1)))

    def _run(self, net, x_in, *args):
        """Run the inner network under the precision policy; return its output in x's dtype."""
        out_dtype = x_in.dtype
        if self.channels_last and x_in.ndim == 4:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        low = self.compute_dtype != torch.float32 and out_dtype != torch.float64
        if low:
            with torch.autocast(device_type=x_in.device.type, dtype=self.compute_dtype):
                y = net(x_in, *args)
        else:
            y = net(x_in, *args)
        return y.to(out_dtype)


class EDMPrecond(Denoiser):
    precond = "edm"

    def __init__(self, model, img_shape, label_dim=0, sigma_data=0.5, sigma_min=0.0, sigma_max=math.inf):
        super().__init__(img_shape, label_dim, sigma_min, sigma_max, sigma_data)
        self.model = model

    def precond_kwargs(self):
        return {
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": None if math.isinf(self.sigma_max) else self.sigma_max,
        }

    def dsm_weight(self, sigma):
        return diffusion.edm_loss_weight(sigma, self.sigma_data)

    def _denoise(self, x, sigma, labels):
        c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(sigma, self.sigma_data)
        f = self._run(self.model, self._bcast(c_in, x) * x, c_noise, labels)
        return self._bcast(c_skip, x) * x + self._bcast(c_out, x) * f


class VPPrecond(Denoiser):
    """Continuous VP (Song et al.): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    precond = "vp"

    def __init__(self, model, img_shape, label_dim=0, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        super().__init__(img_shape, label_dim, self.sigma_of_t(epsilon_t), self.sigma_of_t(1.0), 1.0)
        self.model = model

    def sigma_of_t(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return float(((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt())

    def t_of_sigma(self, sigma):
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def precond_kwargs(self):
        return {"beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M, "epsilon_t": self.epsilon_t}

    def _denoise(self, x, sigma, labels):
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.t_of_sigma(sigma)
        f = self._run(self.model, self._bcast(c_in, x) * x, c_noise, labels)
        return x - self._bcast(sigma, x) * f


class VEPrecond(Denoiser):
    precond = "ve"

    def __init__(self, model, img_shape, label_dim=0, sigma_min=0.02, sigma_max=100.0):
        super().__init__(img_shape, label_dim, sigma_min, sigma_max, 1.0)
        self.model = model

    def precond_kwargs(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def _denoise(self, x, sigma, labels):
        f = self._run(self.model, x, (0.5 * sigma).log(), labels)
        return x + self._bcast(sigma, x) * f


class _GridMixin:
    """Nearest-grid-point rounding (in log sigma) for teachers trained on discrete noise levels."""

    grid: torch.Tensor  # increasing sigmas, float64

    @property
    def is_discrete(self) -> bool:
        return True

    def grid_index(self, sigma: torch.Tensor) -> torch.Tensor:
        log_grid = self.grid.log().to(sigma.device)
        s = sigma.to(torch.float64).clamp_min(1e-30).log().reshape(-1)
        hi = torch.searchsorted(log_grid, s).clamp(1, len(log_grid) - 1)
        lo = hi - 1
        pick_hi = (log_grid[hi] - s).abs() < (s - log_grid[lo]).abs()
        return torch.where(pick_hi, hi, lo).reshape(sigma.shape)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        idx = self.grid_index(torch.as_tensor(sigma))
        return self.grid.to(idx.device)[idx].to(torch.as_tensor(sigma).dtype)


class IDDPMPrecond(_GridMixin, Denoiser):
    """Improved DDPM (cosine schedule) on its discrete grid u_j, as in EDM's baselines."""

    precond = "iddpm"

    def __init__(self, model, img_shape, label_dim=0, C_1=0.001, C_2=0.008, M=1000):
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        u = torch.zeros(M + 1, dtype=torch.float64)
        for j in range(M, 0, -1):
            ratio = (self._alpha_bar(j - 1) / self._alpha_bar(j)).clamp(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        super().__init__(img_shape, label_dim, float(u[M - 1]), float(u[0]), 1.0)
        self.model = model
        self.register_buffer("u", u.float())
        self.grid = u[:M].flip(0)  # increasing

    def _alpha_bar(self, j):
        return torch.sin(0.5 * math.pi * torch.as_tensor(j, dtype=torch.float64) / self.M / (self.C_2 + 1)) ** 2

    def precond_kwargs(self):
        return {"C_1": self.C_1, "C_2": self.C_2, "M": self.M}

    def _denoise(self, x, sigma, labels):
        idx_increasing = self.grid_index(sigma)
        c_noise = (idx_increasing).to(x.dtype)  # M - 1 - j where u is decreasing in j
        c_in = 1 / (sigma**2 + 1).sqrt()
        f = self._run(self.model, self._bcast(c_in, x) * x, c_noise, labels)
        return x - self._bcast(sigma, x) * f[:, : self.img_shape[0]]


class DiscreteVPPrecond(_GridMixin, Denoiser):
    """A discrete-time epsilon-prediction DDPM, eps(x_t, t) with integer t, as an EDM denoiser.

    x_t = sqrt(alpha_bar_t) x_sigma, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), and
    D(x_sigma; sigma_t) = x_sigma - sigma_t eps(x_t, t). sigma is rounded to the model's own grid.
    """

    precond = "discrete-vp"

    def __init__(self, network, img_shape, label_dim=0, timesteps=1000, beta_start=1e-4, beta_end=0.02):
        alpha_bar = diffusion.linear_beta_alpha_bar(timesteps, beta_start, beta_end)
        grid = diffusion.vp_sigma_from_alpha_bar(alpha_bar)
        super().__init__(img_shape, label_dim, float(grid[0]), float(grid[-1]), 0.5)
        self.network = network
        self.timesteps, self.beta_start, self.beta_end = int(timesteps), float(beta_start), float(beta_end)
        self.grid = grid
        self.alpha_bar = alpha_bar

    def precond_kwargs(self):
        return {"timesteps": self.timesteps, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def _denoise(self, x, sigma, labels):
        t = self.grid_index(sigma)
        c_in = 1 / (sigma**2 + 1).sqrt()
        eps = self._run(self.network, self._bcast(c_in, x) * x, t)
        return x - self._bcast(sigma, x) * eps


PRECONDS = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "iddpm": IDDPMPrecond,
    "discrete-vp": DiscreteVPPrecond,
}
