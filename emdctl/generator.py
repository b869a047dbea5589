"""The one-step generator: g(z) = D(sigma* z; sigma*), a denoiser evaluated at one noise level.

It starts as a copy of the teacher (ALGORITHMS.md, 'Generator initialization') and is saved as a
self-contained model directory (weights + JSON config), loadable without the recipe or teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import diffusion
from .errors import UserError
from .networks import build_denoiser
from .networks.precond import Denoiser
from .rng import PerSeedRandom
from .storage import load_model_dir, load_state_strict, module_state, save_model_dir


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: Denoiser, sigma_star: float):
        super().__init__()
        self.denoiser = denoiser
        rounded = denoiser.round_sigma(torch.tensor([float(sigma_star)], dtype=torch.float64))
        self.sigma_star = float(rounded[0])

    @property
    def img_shape(self):
        return self.denoiser.img_shape

    @property
    def label_dim(self):
        return self.denoiser.label_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(z * self.sigma_star, self.sigma_star, labels)

    @torch.no_grad()
    def sample(self, z, labels=None, steps: int = 1, rng: PerSeedRandom | None = None, sigma_min: float = 0.002):
        """`steps` > 1: re-noise the estimate to decreasing sigmas (EDM schedule from sigma* down to
        sigma_min) and denoise again, as few-step distilled samplers do."""
        x = self(z, labels)
        if steps <= 1:
            return x
        if rng is None:
            raise ValueError("multi-step sampling needs per-seed random numbers")
        sigmas = diffusion.karras_schedule(steps, max(sigma_min, self.denoiser.sigma_min), self.sigma_star)[1:-1]
        for s in self.denoiser.round_sigma(sigmas).tolist():
            noise = rng.randn(tuple(z.shape[1:])).to(z.device, z.dtype)
            x = self.denoiser(x + s * noise, s, labels)
        return x

    def config(self, data: dict | None = None) -> dict:
        return {
            "kind": "generator",
            "denoiser": self.denoiser.config(),
            "sigma_star": self.sigma_star,
            "log_snr_star": diffusion.log_snr(self.sigma_star),
            "img_shape": list(self.img_shape),
            "label_dim": self.label_dim,
            "data": data or {},
        }

    def save_pretrained(self, directory: Path, data: dict | None = None, extra: dict | None = None) -> Path:
        return save_model_dir(directory, module_state(self), {**self.config(data), **(extra or {})})


def build_generator(student_config: dict, sigma_star: float, overrides: dict | None = None) -> OneStepGenerator:
    cfg = dict(student_config)
    if overrides:
        cfg["arch_kwargs"] = {**cfg.get("arch_kwargs", {}), **overrides}
    try:
        return OneStepGenerator(build_denoiser(cfg), sigma_star)
    except TypeError as e:
        raise UserError(f"generator.arch_overrides: {e}") from None


def load_generator(directory: Path) -> tuple[OneStepGenerator, dict]:
    config, state = load_model_dir(directory, expect_kind="generator")
    try:
        gen = OneStepGenerator(build_denoiser(config["denoiser"]), config["sigma_star"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory}: config.json does not describe a buildable generator ({e})") from None
    load_state_strict(gen, state, str(directory))
    return gen.eval().requires_grad_(False), config
