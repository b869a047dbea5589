"""GDD / GDD-I (Zheng & Yang 2024, arXiv 2405.20750): distributional distillation by a GAN alone.

The generator g(z) = D_teacher(sigma* z; sigma*) (GDD uses sigma* = 80) is trained against real
data with the non-saturating GAN loss (or the hinge loss); the teacher is never asked for a
target: it only initializes g and, with `discriminator.features: teacher`, serves as the frozen
feature network under the discriminator's heads (networks/discriminator.py). Lazy R1 on real data:
every r1_every iterations the discriminator's loss gains r1_every * r1_gamma / 2 ||grad_x D(x)||^2
(StyleGAN2's lazy-regularization scaling). `discriminator.augment` applies DiffAugment's color,
translation and cutout to everything the discriminator sees, differentiably. GDD-I
(`freeze: gdd-i`) freezes every 3x3 convolution of the generator's U-Net blocks and the attention
output projections (about 85% of DDPM++'s parameters); norms, embeddings, qkv, 1x1 skips, stem and
output layers still train.

The generator step is the shared regression with d = -grad_x l(x) per sample and w = 1, so its
gradient J^T grad_x l is exactly the GAN loss's. The discriminator is not DDP-wrapped (R1 needs a
double backward, which DDP does not support); its gradients are averaged across ranks by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..networks.discriminator import Discriminator, diff_augment
from ..networks.layers import UNetBlock
from ..rng import IterationDraws, derive_seed
from .base import stats_of
from .distill import DistillationMethod


def gdd_i_frozen(module: nn.Module) -> list[str]:
    """Names of the parameters GDD-I freezes: the 3x3 convolutions (conv0, conv1) of every U-Net
    block and the attention output projection (proj)."""
    names = []
    for prefix, m in module.named_modules():
        if isinstance(m, UNetBlock):
            for child in ("conv0", "conv1", "proj"):
                sub = getattr(m, child, None)
                if sub is not None:
                    names += [f"{prefix}.{child}.{n}" for n, _ in sub.named_parameters()]
    return names


def generator_loss(logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Per-sample loss: sum over heads of the mean over positions."""
    f = (lambda v: F.softplus(-v)) if kind == "non-saturating" else (lambda v: -v)
    return sum(f(v).mean(1) for v in logits)


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "non-saturating":
        return sum(F.softplus(-r).mean(1) + F.softplus(f).mean(1) for r, f in zip(real, fake, strict=True))
    return sum(F.relu(1 - r).mean(1) + F.relu(1 + f).mean(1) for r, f in zip(real, fake, strict=True))


def r1_penalty(real_logits: list[torch.Tensor], x_real: torch.Tensor) -> torch.Tensor:
    """Per-sample ||grad_x sum(D(x))||^2 at the real samples, differentiable (for the R1 term)."""
    (grad,) = torch.autograd.grad(sum(v.sum() for v in real_logits), x_real, create_graph=True)
    return grad.square().flatten(1).sum(1)


class GDD(DistillationMethod):
    name = "gdd"
    critic_name = "discriminator"
    plotted = (*DistillationMethod.plotted, "gdd/")
    critic_ddp = False

    def __init__(self, recipe, teacher, dist):
        super().__init__(recipe, teacher, dist)
        # Never compiled: the teacher-feature hooks stop the teacher early by raising, which does
        # not trace; the heads are small next to the generator.
        self.training.fake = self.fake
        self.open_real_data(recipe.method.data)

    # -- networks ------------------------------------------------------------------------------------
    def build_critic(self, teacher) -> nn.Module:
        spec = self.recipe.method.discriminator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.recipe.seed, "discriminator"))  # fresh heads: a function of the seed
            return Discriminator(spec, self.img_shape, self.label_dim, self.teacher)

    def configure_generator(self, generator) -> None:
        if self.recipe.method.freeze != "gdd-i":
            return
        frozen = set(gdd_i_frozen(generator))
        if not frozen:
            raise UserError(
                "method.freeze: gdd-i freezes the 3x3 convolutions of U-Net blocks and this generator "
                f"({type(generator.denoiser).__name__}) has none; use freeze: none"
            )
        for name, p in generator.named_parameters():
            if name in frozen:
                p.requires_grad_(False)

    # -- training ------------------------------------------------------------------------------------------
    def train_step(self, iteration: int) -> dict[str, torch.Tensor]:
        self.set_learning_rates(iteration)
        draws = self.draws(iteration)
        # The generator draws its class labels from the real batch's, so classes appear at data frequency.
        self.hold_real_batches(draws, iteration)
        reals = list(self.reals.values())
        m = self.recipe.method
        r1 = m.r1_gamma > 0 and iteration % m.r1_every == 0
        stats: dict[str, torch.Tensor] = {}
        for j in range(self.recipe.fake_score.steps_per_iteration):
            stats.update(self.discriminator_update(draws, j, reals, r1))
        stats.update(self.generator_update(draws))
        return stats

    def augmented(self, x: torch.Tensor, draws: IterationDraws, stream: str, rows: slice) -> torch.Tensor:
        """What the discriminator sees: x after `discriminator.augment` (per-sample draws from STREAM)."""
        ops = self.recipe.method.discriminator.augment
        if not ops:
            return x
        return diff_augment(x, ops, draws.uniform(stream, (self.batching.global_size, 7), rows))

    def discriminator_update(self, draws: IterationDraws, j: int, reals, r1: bool) -> dict[str, torch.Tensor]:
        m = self.recipe.method
        shape = self.global_shape()
        loss_sum = torch.zeros((), device=self.device)
        logit_real = logit_fake = penalty = torch.zeros((), device=self.device)
        k = len(reals)
        for rows, (x_real, labels) in zip(self.batching.micro_rows(), reals, strict=True):
            with torch.no_grad():
                x_fake = self.inference.generator(draws.normal(f"disc{j}/z", shape, rows), labels)
            x_real = x_real.detach().requires_grad_(r1)
            both = None if labels is None else torch.cat([labels, labels])
            seen = [self.augmented(x_real, draws, f"disc{j}/aug-real", rows),
                    self.augmented(x_fake, draws, f"disc{j}/aug-fake", rows)]  # fmt: skip
            logits = self.training.fake(torch.cat(seen), both)
            real = [v[: len(x_real)] for v in logits]
            fake = [v[len(x_real) :] for v in logits]
            per_sample = discriminator_loss(real, fake, m.loss)
            if r1:
                pen = r1_penalty(real, x_real)
                per_sample = per_sample + 0.5 * m.r1_gamma * m.r1_every * pen
                penalty = penalty + pen.mean().detach() / k
            loss = per_sample.sum() / self.batching.local_size
            loss.backward()
            loss_sum = loss_sum + loss.detach()
            logit_real = logit_real + torch.cat(real, 1).mean().detach() / k
            logit_fake = logit_fake + torch.cat(fake, 1).mean().detach() / k
            self.last_diagnostics = {"stage": "discriminator", "x_real": stats_of(x_real), "x_fake": stats_of(x_fake)}
        if self.dist.enabled:
            for p in self.fake.parameters():
                if p.grad is not None:
                    self.dist.all_reduce_mean_(p.grad)
            loss_sum = self.dist.all_reduce_mean_(loss_sum)
        out = self.optimizer_step(
            "disc", self.opt_fake, self.fake.parameters(), self.recipe.optim.grad_clip_fake, loss_sum
        )
        out.update({"gdd/logit_real": logit_real, "gdd/logit_fake": logit_fake})
        if r1:
            out["gdd/r1_penalty"] = penalty
        return out

    def generator_update(self, draws: IterationDraws) -> dict[str, torch.Tensor]:
        out = super().generator_update(draws)
        out["loss/gen"] = out.pop("gdd/loss_gen")  # the GAN loss, not the regression's 1/2 ||d||^2
        return out

    def generator_direction(self, draws, rows: slice):
        labels = self.reals[rows.start][1] if rows.start in self.reals else None
        x0 = self.training.generator(draws.normal("gen/z", self.global_shape(), rows), labels)
        x = x0.detach().requires_grad_(True)
        per_sample = generator_loss(
            self.fake(self.augmented(x, draws, "gen/aug", rows), labels), self.recipe.method.loss
        )
        (grad,) = torch.autograd.grad(per_sample.sum(), x)
        w = torch.ones(len(x), device=x.device)
        return x0, -grad, w, {"gdd/loss_gen": per_sample.mean().detach()}
