"""Moment Matching (Salimans et al. 2024, arXiv 2406.04103), alternating variant, 1 to 8 steps.

The student samples ancestrally: from z_t at one of its levels t it predicts x~ = g(z_t; t) and
moves to the next level by z_s ~ q(z_s | z_t, x~) (a one-step student maps z_t = sigma* z at
t = sigma* straight to its sample). Moment matching asks that the student's first moment at every
s below a step's level equal the teacher's: E_g[x~ | z_s] = D_teacher(z_s). Training draws s,
takes the step t above it (the smallest level >= s; recipe.schema.MomentMatchingSpec says where z_t
comes from) and re-noises the student's x~ to z_s. The auxiliary denoiser g_phi (the shared
"fake" network, initialized from the teacher) is trained on
    w(s) [ ||x~ - g_phi(z_s)||^2 + ||D_teacher(z_s) - g_phi(z_s)||^2 ],
whose optimum is the average of the two moments, so g_phi - D_teacher is half the mismatch. The
generator loss w(s) x~^T sg(g_phi(z_s) - D_teacher(z_s)) is the shared regression with the
direction d = (D_teacher - g_phi)(z_s) / s^2 (score units, as Diff-Instruct's, so the same
weightings apply: 'sigma2' moves x~ by D_teacher - g_phi). Only the last step is differentiated:
the states before it are inputs, as in the paper.
"""

from __future__ import annotations

import torch

from ..diffusion import posterior_sample
from ..generator import few_step_states
from ..rng import IterationDraws
from .distill import DistillationMethod


class MomentMatching(DistillationMethod):
    name = "moment-matching"
    plotted = (*DistillationMethod.plotted, "mm/")

    def __init__(self, recipe, teacher, dist):
        super().__init__(recipe, teacher, dist)
        m = recipe.method
        self.data_inputs = m.z_t == "data"
        if self.data_inputs:
            self.open_real_data(m.data)

    def configure_generator(self, generator) -> None:
        m = self.recipe.method
        if m.steps > 1:
            generator.set_sampler(m.student_levels(generator.sigma_star), "ancestral")

    def begin_iteration(self, draws: IterationDraws, iteration: int) -> None:
        if self.data_inputs:  # one real batch per iteration, shared by the auxiliary and generator steps
            self.hold_real_batches(draws, iteration)

    def _step_inputs(self, draws: IterationDraws, prefix: str, s, z, labels, rows: slice):
        """(t, z_t, labels) of the student step above each s: t the smallest level >= s, z_t its input."""
        gen = self.generator
        grid = torch.tensor(gen.levels, device=s.device, dtype=s.dtype)  # decreasing
        step = (grid >= s[:, None]).sum(1) - 1
        t = grid[step]
        shape = self.global_shape()
        with torch.no_grad():
            if self.data_inputs:
                x, labels = self.reals[rows.start]
                b = self.per_sample(t)
                diffused = x + b * draws.normal(f"{prefix}/data-noise", shape, rows)
                top = self.per_sample(step == 0)
                return t, torch.where(top, gen.sigma_star * z, diffused), labels
            deepest = int(step.max())
            noises = [draws.normal(f"{prefix}/chain{i}", shape, rows) for i in range(1, deepest + 1)]
            student = self.inference.generator
            states = few_step_states(
                lambda z_t, sigma, y: student(z_t, y, sigma=sigma), z, labels, gen.levels[: deepest + 1], noises,
                "ancestral",
            )  # fmt: skip
            return t, torch.stack(states)[step, torch.arange(len(step), device=step.device)], labels

    def student_sample(self, forward, draws: IterationDraws, prefix: str, levels, rows: slice):
        """(x~ = forward(...) at the student step, z_s, s, labels) of one micro-batch."""
        s, labels, z, noise = self.draw_inputs(draws, prefix, levels, rows)
        gen = self.generator
        # The recipe keeps sigma_max <= sigma*; a discrete teacher's grid can round just above it.
        s = s.clamp_max(gen.sigma_star)
        if gen.steps == 1:  # the one-step student's input is unit noise at sigma*
            t = gen.sigma_star
            x0 = forward(z, labels)
            z_t = t * z
        else:
            t, z_t, labels = self._step_inputs(draws, prefix, s, z, labels, rows)
            x0 = forward(z_t, labels, sigma=t)
        return x0, posterior_sample(x0.detach(), z_t, t, s, noise), s, labels

    def fake_batch(self, draws: IterationDraws, j: int, rows: slice):
        """The auxiliary denoiser's step: at z_s, regress onto both the student's sample and the
        teacher's denoised estimate (the loss of the module docstring)."""
        with torch.no_grad():
            levels = self.recipe.fake_score.noise_levels
            x0, z_s, s, labels = self.student_sample(self.inference.generator, draws, f"mm-aux{j}", levels, rows)
            d_t = self.inference.teacher(z_s, s, labels)
        return z_s, s, labels, x0, (x0, d_t)

    def generator_direction(self, draws, rows: slice):
        levels = self.recipe.method.noise_levels
        x0, z_s, sigma, labels = self.student_sample(self.training.generator, draws, "gen", levels, rows)
        with torch.no_grad():
            d_t = self.inference.teacher(z_s, sigma, labels)
            d_aux = self.inference.fake(z_s, sigma, labels)
        s = self.per_sample(sigma)
        delta = (d_t - d_aux) / s.square()
        w = self.weight(sigma, x0.detach(), d_t)
        return x0, delta, w, {"mm/moment_gap_rms": (d_t - d_aux).square().mean().sqrt()}
