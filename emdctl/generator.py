"""The generator: g(z) = D(sigma* z; sigma*), a denoiser evaluated at one noise level (or, for a
few-step student, at each of a few trained levels by its sampler).

It starts as a copy of the teacher (docs/algorithm.md, 'Generator initialization') and is saved as a
self-contained model directory (weights + JSON config), loadable without the recipe or teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import diffusion
from .errors import UserError
from .networks import build_denoiser, check_config_fits_weights
from .networks.precond import Denoiser
from .rng import PerSeedRandom
from .storage import load_model_dir, load_state_strict, module_state, save_model_dir

SAMPLERS = ("renoise", "ancestral")


def few_step_states(denoise, z, labels, levels: list[float], noises, kind: str) -> list[torch.Tensor]:
    """The noisy states of the few-step sampler started from unit noise z: sigma* z at levels[0],
    then one state per later level s, made from the previous state z_t at level t and its estimate
    x = denoise(z_t, t, labels): 'ancestral' draws z_s ~ q(z_s | z_t, x) (Moment Matching's
    sampler, which keeps the part of z_t that x does not explain), 'renoise' z_s = x + s n (the
    usual multi-step form of one-step generators). noises[i] is the unit noise of step i + 1."""
    states = [z * levels[0]]
    for t, s, n in zip(levels, levels[1:], noises, strict=False):
        x = denoise(states[-1], t, labels)
        states.append(diffusion.posterior_sample(x, states[-1], t, s, n) if kind == "ancestral" else x + s * n)
    return states


class OneStepGenerator(nn.Module):
    """g(z) = D(sigma* z; sigma*). A few-step student (Moment Matching with method.steps > 1) is
    the same network evaluated at each of its trained levels (`levels`, levels[0] = sigma*) by its
    `sampler`; a one-step generator has levels [sigma*]."""

    def __init__(self, denoiser: Denoiser, sigma_star: float, levels: list[float] | None = None, sampler="renoise"):
        super().__init__()
        self.denoiser = denoiser
        rounded = denoiser.round_sigma(torch.tensor([float(sigma_star)], dtype=torch.float64))
        self.sigma_star = float(rounded[0])
        self.set_sampler([self.sigma_star] if levels is None else levels, sampler)

    def set_sampler(self, levels: list[float], sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (got {sampler!r})")
        levels = self._rounded(levels)
        if levels[0] != self.sigma_star or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError(f"levels must decrease from sigma* = {self.sigma_star} (got {levels})")
        self.levels, self.sampler = levels, sampler

    def _rounded(self, levels) -> list[float]:
        return self.denoiser.round_sigma(torch.tensor([float(v) for v in levels], dtype=torch.float64)).tolist()

    @property
    def steps(self) -> int:
        """The number of steps the generator was trained to sample with."""
        return len(self.levels)

    @property
    def img_shape(self):
        return self.denoiser.img_shape

    @property
    def label_dim(self):
        return self.denoiser.label_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, sigma=None) -> torch.Tensor:
        """sigma None: the one-step map of unit noise z. Otherwise one sampler step: the estimate of
        the clean sample from the noisy state z at level sigma (per row)."""
        if sigma is None:
            return self.denoiser(z * self.sigma_star, self.sigma_star, labels)
        return self.denoiser(z, sigma, labels)

    def sampling_levels(self, steps: int | None = None) -> list[float]:
        """The trained levels, or for another step count EDM's schedule down to sigma_min = 0.002."""
        if steps is None or steps == self.steps:
            return self.levels
        return self._rounded(diffusion.few_step_levels(steps, self.sigma_star, max(0.002, self.denoiser.sigma_min)))

    @torch.no_grad()
    def sample(self, z, labels=None, steps: int | None = None, rng: PerSeedRandom | None = None, noises=None):
        """`steps` (default: the trained count) sampler steps from unit noise z; the noise of step i
        comes from `noises[i - 1]` or else the next draw of the per-seed `rng`."""
        levels = self.sampling_levels(steps)
        if len(levels) == 1:
            return self(z, labels)
        if noises is None:
            if rng is None:
                raise ValueError("multi-step sampling needs per-seed random numbers")
            noises = [rng.randn(tuple(z.shape[1:])).to(z.device, z.dtype) for _ in levels[1:]]
        states = few_step_states(self.denoiser, z, labels, levels, noises, self.sampler)
        return self.denoiser(states[-1], levels[-1], labels)

    def config(self, data: dict | None = None) -> dict:
        return {
            "kind": "generator",
            "denoiser": self.denoiser.config(),
            "sigma_star": self.sigma_star,
            "log_snr_star": diffusion.log_snr(self.sigma_star),
            "levels": self.levels,
            "sampler": self.sampler,
            "img_shape": list(self.img_shape),
            "label_dim": self.label_dim,
            "data": data or {},
        }

    def save_pretrained(self, directory: Path, data: dict | None = None, extra: dict | None = None) -> Path:
        return save_model_dir(directory, module_state(self), {**self.config(data), **(extra or {})})


def generator_from_config(config: dict) -> OneStepGenerator:
    """The (untrained) generator a config describes; configs written before few-step students
    have no levels/sampler and are one-step."""
    return OneStepGenerator(
        build_denoiser(config["denoiser"]), config["sigma_star"], config.get("levels"), config.get("sampler", "renoise")
    )


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
    if not isinstance(config.get("denoiser"), dict):
        raise UserError(f"{directory}: config.json has no denoiser description; re-export the generator")
    check_config_fits_weights(config["denoiser"], state, str(directory))
    try:
        gen = generator_from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory}: config.json does not describe a buildable generator ({e})") from None
    load_state_strict(gen, state, str(directory))
    return gen.eval().requires_grad_(False), config
