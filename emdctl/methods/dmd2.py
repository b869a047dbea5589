"""DMD2 (Yin et al. 2024, arXiv 2405.14867): distribution matching plus a GAN on the fake score.

Distribution matching is the Diff-Instruct direction with DMD's per-sample normalization: at
x_t = x + sigma eps (x = g(z) detached), d = (D_t(x_t) - D_f(x_t)) / mean_pixels |x - D_t(x_t)|,
so the shared regression's gradient is -J^T d, exactly DMD2's `0.5 * mse(x, x - grad)` step. No
regression loss (DMD's paired-data term is what DMD2 removes). With `gan: true`, a classifier head
on the fake score network's bottleneck (networks/critic.py, DMD2's conv branch) is trained with
the fake score, on real images and detached generated ones, each noised to its own level from
`gan_levels` (DMD2's diffusion GAN): per sample
    DSM + gan_disc_weight * (pixels) * (softplus(l(x_fake + s_f n_f)) + softplus(-l(x_real + s_r n_r)));
the generator adds gan_gen_weight * (pixels) * softplus(-l(x + s n)) (non-saturating), its gradient
reaching x through the fake score's encoder and the head. Two time scales: the fake score and the
head take fake_score.steps_per_iteration steps per generator step (DMD2: 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..networks.critic import FakeScoreCritic
from ..rng import derive_seed
from .distill import DistillationMethod, gan_stats


class DMD2(DistillationMethod):
    name = "dmd2"
    plotted = (*DistillationMethod.plotted, "dmd2/")
    networks_in_backward = 2  # the generator and (GAN) the fake score's encoder

    def __init__(self, recipe, teacher, dist):
        super().__init__(recipe, teacher, dist)
        if recipe.method.gan:
            self.training.fake = self.training.fake_ddp  # the logits come from a hook: uncompiled
            self.open_real_data(recipe.method.data)

    def build_critic(self, teacher):
        denoiser = super().build_critic(teacher)
        if not self.recipe.method.gan:
            return denoiser
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.recipe.seed, "dmd2/head"))  # the head: a function of the seed
            return FakeScoreCritic(denoiser, "conv")

    def begin_iteration(self, draws, iteration):
        if self.recipe.method.gan:
            self.hold_real_batches(draws, iteration)

    def generator_direction(self, draws, rows: slice):
        m = self.recipe.method
        sigma, labels, z, eps = self.generator_inputs(draws, rows)
        x0 = self.training.generator(z, labels)
        x = x0.detach()
        s = self.per_sample(sigma)
        with torch.no_grad():
            d_t = self.inference.teacher(x + s * eps, sigma, labels)
            d_f = self.inference.fake(x + s * eps, sigma, labels)
        norm = (x - d_t).abs().flatten(1).mean(1).clamp_min(1e-6)
        d = (d_t - d_f) / norm.reshape(s.shape)
        stats = {"dmd2/normalizer": norm.mean()}
        if m.gan:
            x = x.requires_grad_(True)
            s_gan = self.draw_sigma(draws, "gen/gan_sigma", m.gan_levels, rows)
            noise = draws.normal("gen/gan_noise", self.global_shape(), rows)
            _, logits = self.fake(x + self.per_sample(s_gan) * noise, s_gan, labels, features=True)
            gan = m.gan_gen_weight * math.prod(self.img_shape) * F.softplus(-logits).mean(1)
            (grad,) = torch.autograd.grad(gan.sum(), x)
            d = d - grad
            stats["dmd2/loss_gan"] = gan.mean().detach()
        return x0, d, torch.ones_like(sigma), stats

    def critic_loss(self, draws, j, rows):
        m = self.recipe.method
        if not m.gan:
            return super().critic_loss(draws, j, rows)
        sigma, labels, z, noise = self.draw_inputs(draws, f"fake{j}", self.recipe.fake_score.noise_levels, rows)
        with torch.no_grad():
            x0 = self.inference.generator(z, labels)
        x_real, real_labels = self.reals[rows.start]
        shape = self.global_shape()
        s_fake = self.draw_sigma(draws, f"fake{j}/gan_sigma_fake", m.gan_levels, rows)
        s_real = self.draw_sigma(draws, f"fake{j}/gan_sigma_real", m.gan_levels, rows)
        n_fake = draws.normal(f"fake{j}/gan_noise_fake", shape, rows)
        n_real = draws.normal(f"fake{j}/gan_noise_real", shape, rows)

        b = self.per_sample
        inputs = [x0 + b(sigma) * noise, x0 + b(s_fake) * n_fake, x_real + b(s_real) * n_real]
        all_labels = None if labels is None else torch.cat([labels, labels, real_labels])
        dsm, logits = self.fake_and_logits(inputs, [sigma, s_fake, s_real], all_labels, x0, sigma, x_real)
        n = len(x0)
        fake_l, real_l = logits[n : 2 * n], logits[2 * n :]
        cls = F.softplus(fake_l).mean(1) + F.softplus(-real_l).mean(1)
        return dsm + m.gan_disc_weight * math.prod(self.img_shape) * cls, gan_stats(
            "dmd2", "loss_cls", cls, real_l, fake_l
        )
