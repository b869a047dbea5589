"""EM Distillation (Xie et al. 2024): maximum-likelihood (forward-KL) distillation.

E-step: K Langevin steps on (eps, z) started at the student, targeting
p_teacher(x) / q_theta(x) N(eps) N(z) (emdctl.langevin). M-step: regress g(z^K) onto
g(z^K) + sigma * eps_tilde, i.e. move along d = eps_tilde / sigma (alpha = 1).
K = 0 gives d = 0; K = 1 with gamma_z = 0 and noise cancellation gives gamma_eps times the
Diff-Instruct direction.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..langevin import e_step
from ..rng import derive_seed
from .distill import DistillationMethod


class EMD(DistillationMethod):
    name = "emd"
    plotted = (*DistillationMethod.plotted, "langevin/")

    def __init__(self, recipe, teacher, dist):
        super().__init__(recipe, teacher, dist)
        lang, prec = recipe.method.langevin, recipe.precision
        self.e_step_fn = e_step
        self.e_step_nets = (self.inference.generator, self.inference.teacher, self.inference.fake)
        if self.compiled and lang.fused_update == "off":
            # The whole loop as one graph (K is fixed; no data-dependent Python control flow inside),
            # with the plain modules inside so that the networks inline into it.
            graphs = prec.cuda_graphs and lang.gamma_z == 0
            self.e_step_fn = torch.compile(e_step, dynamic=False, mode="reduce-overhead" if graphs else None)
            self.e_step_nets = (self.generator, self.teacher, self.fake)

    def _fused_update(self, draws, rows: slice):
        lang = self.recipe.method.langevin
        use = lang.fused_update == "on" and lang.gamma_z == 0 and kernels.available(self.device)
        if not use:
            return None

        def update(d_t, d_f, eps, ledger, sigma, k):
            seed = derive_seed(draws.seed, draws.iteration, f"emd/xi_eps/{k}")
            return kernels.fused_eps_update(
                d_t.contiguous(),
                d_f.contiguous(),
                eps,
                ledger,
                sigma,
                lang.gamma_eps,
                lang.prior_pull,
                seed,
                row_offset=rows.start,
            )

        return update

    def generator_direction(self, draws, rows: slice):
        lang = self.recipe.method.langevin
        shape = self.global_shape()
        sigma, labels, z0, eps0 = self.generator_inputs(draws, rows)
        fused = self._fused_update(draws, rows)
        xi_eps = None if fused else [draws.normal(f"emd/xi_eps/{k}", shape, rows) for k in range(lang.steps)]
        xi_z = [draws.normal(f"emd/xi_z/{k}", shape, rows) for k in range(lang.steps)] if lang.gamma_z > 0 else None
        gamma_z = lang.gamma_z
        if lang.gamma_z > 0 and lang.z_step_scaling == "sigma2":
            sd2 = self.generator.denoiser.sigma_data**2
            gamma_z = lang.gamma_z * sigma.square() / (sigma.square() + sd2)
        res = self.e_step_fn(
            *self.e_step_nets,
            z0,
            eps0,
            sigma,
            labels,
            xi_eps,
            xi_z,
            steps=lang.steps,
            gamma_eps=lang.gamma_eps,
            gamma_z=gamma_z,
            cancel_noise=lang.cancel_noise,
            cancel_noise_z=lang.cancel_noise_z,
            prior_pull=lang.prior_pull,
            fused_update=fused,
        )
        x0 = self.training.generator(res.z, labels)
        s = self.per_sample(sigma)
        d = res.eps_m / s
        w = self.weight(sigma, x0.detach(), res.d_teacher)
        return x0, d, w, res.stats
