"""Moment Matching (Salimans et al. 2024, arXiv 2406.04103), alternating variant, one step.

The student x~ = g(z) maps z_t = sigma* z (its input, noise level t = sigma*) to a clean image.
Moment matching re-noises x~ with the forward process's posterior, z_s ~ q(z_s | z_t, x~) for
s < t, and asks that the student's first moment there equal the teacher's:
E_g[x~ | z_s] = D_teacher(z_s). The auxiliary denoiser g_phi (the shared "fake" network,
initialized from the teacher) is trained on
    w(s) [ ||x~ - g_phi(z_s)||^2 + ||D_teacher(z_s) - g_phi(z_s)||^2 ],
whose optimum is the average of the two moments, so g_phi - D_teacher is half the mismatch. The
generator loss w(s) x~^T sg(g_phi(z_s) - D_teacher(z_s)) is the shared regression with the
direction d = (D_teacher - g_phi)(z_s) / s^2 (score units, as Diff-Instruct's, so the same
weightings apply: 'sigma2' moves x~ by D_teacher - g_phi).
"""

from __future__ import annotations

import torch

from ..rng import IterationDraws
from .distill import DistillationMethod


def posterior_sample(x: torch.Tensor, z_t: torch.Tensor, sigma_t: float, sigma_s: torch.Tensor, noise: torch.Tensor):
    """z_s ~ q(z_s | z_t, x) of the variance-exploding forward process z = x + sigma n, for s <= t:
    mean x + (s^2 / t^2)(z_t - x), variance s^2 (1 - s^2 / t^2)."""
    s = sigma_s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    r = s.square() / sigma_t**2
    return x + r * (z_t - x) + s * (1 - r).clamp_min(0).sqrt() * noise


class MomentMatching(DistillationMethod):
    name = "moment-matching"

    def _re_noised(self, draws: IterationDraws, prefix: str, levels, rows: slice):
        """(z, labels, s, noise) of one micro-batch: the student's input and a level s <= t."""
        sigma, labels, z, noise = self.draw_inputs(draws, prefix, levels, rows)
        # The recipe keeps sigma_max <= sigma*; a discrete teacher's grid can round just above it.
        return z, labels, sigma.clamp_max(self.generator.sigma_star), noise

    def _z_s(self, x0: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = self.generator.sigma_star
        return posterior_sample(x0, t * z, t, sigma, noise)

    def fake_batch(self, draws: IterationDraws, j: int, rows: slice):
        """The auxiliary denoiser's step: at z_s, regress onto both the student's sample and the
        teacher's denoised estimate (the loss of the module docstring)."""
        z, labels, sigma, noise = self._re_noised(draws, f"mm-aux{j}", self.recipe.fake_score.noise_levels, rows)
        with torch.no_grad():
            x0 = self.gen_fn(z, labels)
            z_s = self._z_s(x0, z, sigma, noise)
            d_t = self.teacher_fn(z_s, sigma, labels)
        return z_s, sigma, labels, x0, (x0, d_t)

    def generator_direction(self, draws, rows: slice):
        z, labels, sigma, noise = self._re_noised(draws, "gen", self.recipe.method.noise_levels, rows)
        x0 = self.generator_m(z, labels)
        z_s = self._z_s(x0.detach(), z, sigma, noise)
        with torch.no_grad():
            d_t = self.teacher_fn(z_s, sigma, labels)
            d_aux = self.fake_fn(z_s, sigma, labels)
        s = sigma.reshape(-1, *([1] * len(self.img_shape)))
        delta = (d_t - d_aux) / s.square()
        w = self.weight(sigma, x0.detach(), d_t)
        return x0, delta, w, {"mm/moment_gap_rms": (d_t - d_aux).square().mean().sqrt()}
