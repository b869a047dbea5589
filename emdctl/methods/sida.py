"""SiDA (Zhou et al. 2024, arXiv 2410.14919): SiD plus a GAN whose discriminator is the fake score's
encoder; SiD²A is SiDA started from a SiD generator (`generator.init_from`).

The discriminator's logits are the channel mean of the fake score network's bottleneck at the
noisy input (networks/critic.py, no parameters of its own), so the fake score network learns to
denoise the generator's samples and to tell real from generated ones with one encoder.
Fake-score step, per sample: DSM at x_fake + sigma n plus
    gan_disc_weight * lambda(sigma) * (softplus(-l(x_real + sigma n)) + softplus(l(x_fake + sigma n))) / 2
(same sigma and noise for both; l averaged over positions; the generated images take the real
batch's class labels). Generator step, per sample: SiD's loss plus
    gan_gen_weight * (pixels) * softplus(-clamp(l(x_t), -10, 10)) / mean|x - D_t|
at SiD's own x_t, from the same fake-score forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..networks.critic import FakeScoreCritic
from .distill import gan_stats
from .sid import SiD


class SiDA(SiD):
    name = "sida"
    plotted = (*SiD.plotted, "sida/")

    def __init__(self, recipe, teacher, dist):
        super().__init__(recipe, teacher, dist)
        # The logits come from a hook on the encoder: the critic runs uncompiled.
        self.training.fake = self.training.fake_ddp
        self.open_real_data(recipe.method.data)

    def build_critic(self, teacher):
        return FakeScoreCritic(super().build_critic(teacher), "channel-mean")

    def begin_iteration(self, draws, iteration):
        self.hold_real_batches(draws, iteration)

    def fake_at(self, x_t, sigma, labels):
        return self.fake(x_t, sigma, labels, features=True)

    def gan_loss(self, logits, norm):
        numel = math.prod(self.img_shape)
        return self.recipe.method.gan_gen_weight * numel * F.softplus(-logits.clamp(-10, 10)).mean(1) / norm

    def critic_loss(self, draws, j, rows):
        x_real, labels = self.reals[rows.start]
        shape = self.global_shape()
        sigma = self.draw_sigma(draws, f"fake{j}/sigma", self.recipe.fake_score.noise_levels, rows)
        noise = draws.normal(f"fake{j}/noise", shape, rows)
        with torch.no_grad():
            x0 = self.inference.generator(draws.normal(f"fake{j}/z", shape, rows), labels)
        s = self.per_sample(sigma)
        both_labels = None if labels is None else torch.cat([labels, labels])
        dsm, logits = self.fake_and_logits(
            [x0 + s * noise, x_real + s * noise], [sigma, sigma], both_labels, x0, sigma, x_real
        )
        n = len(x0)
        bce = (F.softplus(logits[:n]).mean(1) + F.softplus(-logits[n:]).mean(1)) / 2
        stats = gan_stats("sida", "loss_disc", bce, logits[n:], logits[:n])
        return dsm + self.recipe.method.gan_disc_weight * self.fake.dsm_weight(sigma) * bce, stats
