"""Diff-Instruct / VSD (Luo et al. 2023; Wang et al. 2023): reverse-KL, mode-seeking distillation.

Generator gradient E[w alpha J_theta^T (s_fake(x_t) - s_teacher(x_t))] with x_t = g(z) + sigma eps,
i.e. the direction d = Delta = (D_teacher - D_fake) / sigma^2 at the (detached) noisy sample.
"""

from __future__ import annotations

import torch

from .distill import DistillationMethod


class DiffInstruct(DistillationMethod):
    name = "diff-instruct"
    plotted = (*DistillationMethod.plotted, "di/")

    def generator_direction(self, draws, rows: slice):
        sigma, labels, z, eps = self.generator_inputs(draws, rows)
        x0 = self.training.generator(z, labels)
        s = self.per_sample(sigma)
        x = x0.detach() + s * eps
        with torch.no_grad():
            d_t = self.inference.teacher(x, sigma, labels)
            d_f = self.inference.fake(x, sigma, labels)
        delta = (d_t - d_f) / s.square()
        w = self.weight(sigma, x0.detach(), d_t)
        return x0, delta, w, {"di/sigma_delta_rms": (s * delta).square().mean().sqrt()}
