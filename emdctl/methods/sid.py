"""Score identity Distillation (Zhou et al. 2024, arXiv 2404.04057).

At x_t = x + sigma n, with x = g(z), the generator minimizes per sample
    L = sum_pixels (D_t - D_f) * ((D_t - x) - alpha (D_t - D_f)) / mean_pixels |x - D_t|
(the official code's form of the paper's loss; alpha = 1.2 in the paper), where D_t and D_f are the
teacher's and the fake score's denoised estimates at x_t and the normalizer is held constant. The
gradient flows through x directly and through x_t into both (frozen) networks, so the step's
direction d = -dL/dx is computed by autograd; the shared regression then gives J^T dL/dx exactly.

Special case (tests/test_sid.py): without the paths through the networks, dL/dx = -(D_t - D_f) /
mean|x - D_t| for every alpha, i.e. the Diff-Instruct direction with DMD's per-sample normalization;
the networks' paths are what alpha weighs. At alpha = 1 the loss is (D_t - D_f) . (D_f - x).
"""

from __future__ import annotations

import torch

from .distill import DistillationMethod


def sid_loss(d_t: torch.Tensor, d_f: torch.Tensor, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample SiD loss, per-sample normalizer mean|x - D_t|, held constant)."""
    norm = (x - d_t).detach().float().abs().flatten(1).mean(1).clamp_min(1e-5)
    diff = d_t - d_f
    per = (diff * ((d_t - x) - alpha * diff)).flatten(1).sum(1)
    return per / norm, norm


class SiD(DistillationMethod):
    name = "sid"
    plotted = (*DistillationMethod.plotted, "sid/")
    networks_in_backward = 3  # the generator, and the teacher and fake score it differentiates through

    def fake_at(self, x_t, sigma, labels):
        """D_fake(x_t) with its gradient with respect to x_t, and the GAN logits (SiDA) or None."""
        return self.inference.fake(x_t, sigma, labels), None

    def gan_loss(self, logits, norm) -> torch.Tensor | int:
        """The generator's per-sample adversarial term (SiDA)."""
        return 0

    def generator_direction(self, draws, rows: slice):
        sigma, labels, z, eps = self.generator_inputs(draws, rows)
        x0 = self.training.generator(z, labels)
        x = x0.detach().requires_grad_(True)
        s = self.per_sample(sigma)
        x_t = x + s * eps
        d_t = self.inference.teacher(x_t, sigma, labels)
        d_f, logits = self.fake_at(x_t, sigma, labels)
        per, norm = sid_loss(d_t, d_f, x, self.recipe.method.alpha)
        gan = self.gan_loss(logits, norm)
        (grad,) = torch.autograd.grad((per + gan).sum(), x)
        stats = {"sid/loss": per.mean().detach(), "sid/normalizer": norm.mean()}
        if logits is not None:
            stats["sida/loss_gan"] = gan.mean().detach()
        return x0, -grad, torch.ones_like(sigma), stats

    def generator_update(self, draws):
        out = super().generator_update(draws)
        out["loss/gen"] = out.pop("sid/loss")  # SiD's loss, not the regression's 1/2 ||d||^2
        return out
