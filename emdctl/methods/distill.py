"""Shared machinery of the distillation methods (EMD, Diff-Instruct, Moment Matching, GDD).

Networks: the frozen teacher, the generator g (initialized from the teacher at sigma*), its EMA,
and a second trained network `fake`: the fake score (initialized from the teacher, trained every
iteration by denoising score matching on fresh, detached generator samples), Moment Matching's
auxiliary denoiser, or GDD's discriminator. A method only says which direction d the
generator should move its samples in; the M-step is always the regression
    L = 1/2 w(sigma) || g(z) - sg(g(z) + d) ||^2,   grad = -w J_theta^T d.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import diffusion
from ..data import IterationLoader, open_dataset
from ..errors import UserError
from ..generator import OneStepGenerator, build_generator
from ..memory import check_fits
from ..networks import build_denoiser
from ..networks.critic import FakeScoreCritic
from ..networks.diffusers_nets import share_frozen_base, with_lora_keys
from ..networks.precond import Denoiser
from ..precision import apply_policy, compile_for
from ..rng import IterationDraws, PerSeedRandom, derive_seed
from ..storage import load_state_strict
from ..teachers import Teacher
from .base import Method, decay_factor, make_adam, no_sync, stats_of, wrap_ddp


def gan_stats(prefix: str, loss_name: str, loss, real_logits, fake_logits) -> dict[str, torch.Tensor]:
    """What metrics.jsonl records of a discriminator step: its loss and the mean logits."""
    return {
        f"{prefix}/{loss_name}": loss.mean().detach(),
        f"{prefix}/logit_real": real_logits.mean().detach(),
        f"{prefix}/logit_fake": fake_logits.mean().detach(),
    }


def with_lora(overrides: dict, lora, seed: int) -> dict:
    """arch_overrides plus a LoRA spec (recipe.schema.LoRA), which diffusers networks take as
    arch_kwargs.lora; `seed` fixes the adapters' random start."""
    return {**overrides, "lora": {**lora.model_dump(), "seed": seed}} if lora is not None else dict(overrides)


@dataclass
class Inference:
    """Forwards that take no gradient into their own weights: the teacher's targets, the E-step,
    samples for the critic (compiled on a GPU when the recipe asks)."""

    teacher: Callable
    generator: Callable
    fake: Callable


@dataclass
class Training:
    """The two trained networks as their optimizer steps see them: wrapped for DDP (no_sync on all
    but the last micro-batch) and their (compiled) forwards."""

    generator_ddp: nn.Module
    fake_ddp: nn.Module
    generator: Callable
    fake: Callable


class DistillationMethod(Method):
    critic_name = "fake"  # the second network's name in checkpoints and configs
    plotted = (*Method.plotted, "gen/")
    critic_ddp = True  # whether `fake` is trained through DDP (GDD averages its gradients by hand)
    networks_in_backward = 1  # networks whose activations the generator's backward holds (memory estimate)

    def __init__(self, recipe, teacher: Teacher, dist):
        super().__init__(recipe, dist)
        self.teacher_info = teacher
        self.teacher = teacher.denoiser.to(self.device).eval().requires_grad_(False)
        self.img_shape = tuple(teacher.img_shape)
        self.label_dim = teacher.label_dim
        self.conditions = teacher.conditions
        prec = recipe.precision
        config = {**teacher.student_config}
        gen_overrides = with_lora(recipe.generator.arch_overrides, recipe.generator.lora,
                                  derive_seed(recipe.seed, "lora/generator"))  # fmt: skip
        config["arch_kwargs"] = {**config.get("arch_kwargs", {}), **gen_overrides}
        # Before anything is allocated: the generator, its EMA and the critic, with the gradients and
        # two Adam moments of generator and critic (9 copies of a student's float32 weights).
        check_fits(config, 9, self.batching.micro, prec.dtype, prec.checkpointing, self.device,
                   "the teacher's network with generator.arch_overrides", self.networks_in_backward)  # fmt: skip
        gen = build_generator(teacher.student_config, recipe.generator.sigma_star, gen_overrides)
        for m in (self.teacher, gen):
            apply_policy(m, prec.dtype, prec.channels_last, prec.checkpointing)
        self.configure_generator(gen)
        fake = self.build_critic(teacher)
        self.generator: OneStepGenerator = gen.to(self.device).train()
        self.generator_ema: OneStepGenerator = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.fake = fake.to(self.device).train()
        base = getattr(self.teacher, "base", self.teacher)  # (a guided teacher wraps the network)
        shared = 0
        for student in (self.generator, self.generator_ema, self.fake):  # LoRA: one frozen base, the teacher's
            shared += share_frozen_base(getattr(student, "denoiser", student), base)
        self._shared = frozenset(t.data_ptr() for t in base.parameters()) if shared else frozenset()
        o = recipe.optim
        trainable = [p for p in self.generator.parameters() if p.requires_grad]
        adamw = o.optimizer == "adamw"
        self.opt_gen = make_adam(trainable, o.lr_gen, o.betas_gen, o.eps, o.weight_decay, self.device, adamw)
        critic_trainable = [p for p in self.fake.parameters() if p.requires_grad]  # GDD: frozen feature nets
        self.opt_fake = make_adam(critic_trainable, o.lr_fake, o.betas_fake, o.eps, o.weight_decay, self.device, adamw)
        self.reals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # hold_real_batches
        self.pin_level = recipe.method.levels_pinned()  # recipe.schema.PinnableSpec says why
        # Compiled on CUDA when the recipe asks (precision.compile); CPU paths stay plain PyTorch.
        self.compiled = recipe.precision.compile and self.device.type == "cuda"
        self.inference = Inference(
            compile_for(self.teacher, prec, self.device),
            compile_for(self.generator, prec, self.device),
            compile_for(self.fake, prec, self.device),
        )
        generator_ddp = wrap_ddp(self.generator, dist)
        fake_ddp = wrap_ddp(self.fake, dist) if self.critic_ddp else self.fake
        self.training = Training(
            generator_ddp,
            fake_ddp,
            compile_for(generator_ddp, prec, self.device),  # the M-step's forward/backward
            compile_for(fake_ddp, prec, self.device),  # the fake score's DSM step
        )

    def build_critic(self, teacher: Teacher) -> nn.Module:
        """The second trained network (`self.fake`): here the fake score, a denoiser of the
        teacher's architecture (Moment Matching uses it as its auxiliary denoiser)."""
        cfg = dict(teacher.student_config)
        overrides = with_lora(self.recipe.fake_score.arch_overrides, self.recipe.fake_score.lora,
                              derive_seed(self.recipe.seed, "lora/fake"))  # fmt: skip
        if overrides:
            cfg["arch_kwargs"] = {**cfg.get("arch_kwargs", {}), **overrides}
        prec = self.recipe.precision
        return apply_policy(build_denoiser(cfg), prec.dtype, prec.channels_last, prec.checkpointing)

    def configure_generator(self, generator: OneStepGenerator) -> None:
        """Adjust the generator before its optimizer is built (GDD-I freezes layers here)."""

    # -- trainer interface -------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "generator_ema": self.generator_ema, self.critic_name: self.fake}

    def optimizers(self):
        return {"generator": self.opt_gen, self.critic_name: self.opt_fake}

    def shared_with_teacher(self) -> frozenset:
        return self._shared

    def ema_pairs(self):
        return [(self.generator_ema, self.generator)]

    def configs(self) -> dict:
        return {
            "generator": self.generator.config(self.data_info()),
            self.critic_name: self.fake.config(),
            "teacher": self.teacher_info.describe(),
        }

    def initialize(self) -> None:
        """The generator, its EMA and a denoiser critic start as the teacher (GDD's discriminator
        and DMD2's classifier head keep their own seeded initialization); with generator.init_from,
        the generator and its EMA start from that run's (EMA) generator instead."""
        weights = self.teacher_info.init_weights()
        targets = [self.generator.denoiser, self.generator_ema.denoiser]
        critic = self.fake.denoiser if isinstance(self.fake, FakeScoreCritic) else self.fake
        if isinstance(critic, Denoiser):
            targets.append(critic)
        for target in targets:  # (a LoRA student takes the teacher's weights as its frozen base)
            state = with_lora_keys(target.state_dict(), weights)
            load_state_strict(target, state, f"teacher weights ({self.teacher_info.source})")
        source = self.recipe.generator.init_from
        if source is not None:
            self.start_generator_from(source)

    def start_generator_from(self, source: Path) -> None:
        from ..sampling import open_generator

        what = f"generator.init_from ({source})"
        try:
            gen, _ = open_generator(source, use_ema=True)
        except UserError as e:
            raise UserError(f"{what}: {e}") from None
        if not isinstance(gen, OneStepGenerator):
            raise UserError(f"{what}: ONNX/TorchScript exports cannot be trained; give the run or a safetensors export")
        if abs(gen.sigma_star - self.generator.sigma_star) > 1e-6 * self.generator.sigma_star:
            raise UserError(
                f"{what}: that generator was trained at sigma* = {gen.sigma_star:g}, this recipe's is "
                f"{self.generator.sigma_star:g}; set generator.sigma_init to {gen.sigma_star:g}"
            )
        state = gen.denoiser.state_dict()
        for target in (self.generator.denoiser, self.generator_ema.denoiser):
            load_state_strict(target, state, what)

    def data_info(self) -> dict:
        if self.teacher_info.data is not None:
            return dict(self.teacher_info.data)
        if len(self.img_shape) == 3:
            return {"kind": "image", "range": [-1.0, 1.0]}
        return {"kind": "vector"}

    def set_learning_rates(self, iteration: int) -> None:
        r = self.recipe
        f = decay_factor(r.optim.decay, iteration * r.batch.size, r.duration, r.optim.warmup)
        for opt, lr in ((self.opt_gen, r.optim.lr_gen), (self.opt_fake, r.optim.lr_fake)):
            for g in opt.param_groups:
                g["lr"] = lr * f

    def train_step(self, iteration: int) -> dict[str, torch.Tensor]:
        self.set_learning_rates(iteration)
        draws = self.draws(iteration)
        self.begin_iteration(draws, iteration)
        stats: dict[str, torch.Tensor] = {}
        for j in range(self.recipe.fake_score.steps_per_iteration):
            stats.update(self.fake_update(draws, j))
        stats.update(self.generator_update(draws))
        return stats

    def begin_iteration(self, draws: IterationDraws, iteration: int) -> None:
        """Inputs the iteration's updates share (Moment Matching's real batch)."""

    # -- real data ---------------------------------------------------------------------------------
    def open_real_data(self, spec) -> None:
        """The real samples of method.data (a DataSpec), or for a mixture teacher (spec None) the mixture."""
        self.mixture = self.teacher_info.mixture
        self.loader = None
        self.real_conditions = self.conditions
        if spec is None:
            return
        dataset = open_dataset(spec.path, spec.format, spec.labels, spec.max_images, spec.resolution)
        pixels = self.teacher_info.pixel_shape
        if tuple(dataset.shape()) != pixels:
            raise UserError(
                f"method.data: {spec.path} holds {tuple(dataset.shape())} images, the teacher makes {pixels}"
            )
        if self.teacher_info.captions is not None:
            # A text-conditioned teacher: each real image comes with its own caption, encoded like the prompts.
            if spec.captions is None:
                raise UserError("method.data.captions: the teacher is text-conditioned; give the images' captions "
                                "(JSONL of {\"file\": ..., \"prompt\": ...})")  # fmt: skip
            from ..data import caption_indices

            dataset.labels = caption_indices(dataset, spec.captions)
            self.real_conditions = self.teacher_info.caption_conditions(spec.captions)
        elif spec.captions is not None:
            raise UserError("method.data.captions: captions are for text-conditioned (diffusers) teachers; remove it")
        elif self.label_dim and (not spec.labels or dataset.labels is None):
            raise UserError(
                f"method.data: the teacher is class-conditional; {spec.path} needs labels (data.labels: true)"
            )
        self.loader = IterationLoader(dataset, self.recipe.seed, self.batching, self.device, spec.xflip, "real/xflip")

    def hold_real_batches(self, draws: IterationDraws, iteration: int) -> None:
        """This iteration's real micro-batches, by their first global row (`self.reals[rows.start]`)."""
        batches = self.real_batches(draws, iteration)
        self.reals = {rows.start: b for rows, b in zip(self.batching.micro_rows(), batches, strict=True)}

    def real_batches(self, draws: IterationDraws, iteration: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(x, labels) of this rank's micro-batches of real data: drawn from the mixture itself, or
        the dataset's images in the order fixed by (seed, global sample number)."""
        if self.loader is not None:
            encode = self.teacher_info.encode or (lambda x: x)  # latent teachers: real images through the VAE
            batches = self.loader.images(iteration, draws)
            return [(encode(x), self.real_conditions(y) if self.conditions.count else None) for x, y in batches]
        n, out = self.batching.global_size, []
        for rows in self.batching.micro_rows():
            u = draws.uniform("real/component", (n,), rows)
            out.append((self.mixture.transform(u, draws.normal("real/noise", (n, self.mixture.dim), rows)), None))
        return out

    # -- sampling helpers --------------------------------------------------------------------------
    def draw_sigma(self, draws: IterationDraws, stream: str, levels, rows: slice) -> torch.Tensor:
        n = self.batching.global_size
        if diffusion.sigma_uses_normal_draws(levels):
            u = draws.normal(stream, (n,), rows)
        else:
            u = draws.uniform(stream, (n,), rows)
        sigma = diffusion.sample_sigma(levels, u)
        return self.teacher.round_sigma(sigma).to(torch.float32)

    def draw_labels(self, draws: IterationDraws, stream: str, rows: slice) -> torch.Tensor | None:
        if not self.conditions.count:
            return None
        return self.conditions(draws.integers(stream, self.conditions.count, self.batching.global_size, rows))

    def global_shape(self) -> tuple[int, ...]:
        return (self.batching.global_size, *self.img_shape)

    def per_sample(self, v: torch.Tensor) -> torch.Tensor:
        """A per-sample value [N] shaped to broadcast over each sample's pixels."""
        return v.reshape(-1, *([1] * len(self.img_shape)))

    def draw_inputs(self, draws: IterationDraws, prefix: str, levels, rows: slice, noise: str = "noise"):
        """(sigma, labels, z, noise) of one micro-batch, from the streams PREFIX/sigma, /labels, /z
        and /NOISE (each stream is its own generator, so the order of the draws does not matter)."""
        shape = self.global_shape()
        sigma = self.draw_sigma(draws, f"{prefix}/sigma", levels, rows)
        labels = self.draw_labels(draws, f"{prefix}/labels", rows)
        return sigma, labels, draws.normal(f"{prefix}/z", shape, rows), draws.normal(f"{prefix}/{noise}", shape, rows)

    # -- fake score --------------------------------------------------------------------------------
    def fake_batch(self, draws: IterationDraws, j: int, rows: slice):
        """(input, sigma, labels, x0, targets) of one micro-batch of fake-score step j: the loss is
        dsm_weight(sigma) * sum over targets of ||D_fake(input; sigma) - target||^2. Here DSM on the
        detached generator sample x0 re-noised to sigma."""
        sigma, labels, z, noise = self.draw_inputs(draws, f"fake{j}", self.recipe.fake_score.noise_levels, rows)
        with torch.no_grad():
            x0 = self.inference.generator(z, labels)
        return x0 + self.per_sample(sigma) * noise, sigma, labels, x0, (x0,)

    def critic_loss(self, draws: IterationDraws, j: int, rows: slice) -> tuple[torch.Tensor, dict]:
        """Per-sample loss of the second network at step j on one micro-batch, and stats to report
        (averaged over micro-batches). Here denoising score matching as `fake_batch` describes."""
        x_in, sigma, labels, x0, targets = self.fake_batch(draws, j, rows)
        d = self.training.fake(x_in, sigma, labels)
        err = sum((d - t).square() for t in targets)
        self.last_diagnostics = {"stage": "fake", "sigma": stats_of(sigma), "x0": stats_of(x0), "d_fake": stats_of(d)}
        return self.fake.dsm_weight(sigma) * err.flatten(1).sum(1), {}

    def fake_and_logits(self, inputs, sigmas, labels, x0, sigma, x_real) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-score step of the methods whose discriminator reads the fake score (SiDA, DMD2):
        one forward over the rows of `inputs` (the generated x0 noised to sigma first, then the rows
        the logits are for), returning the per-sample DSM loss of the first rows and every row's logits."""
        d, logits = self.training.fake(torch.cat(inputs), torch.cat(sigmas), labels, features=True)
        self.last_diagnostics = {
            "stage": "fake",
            "sigma": stats_of(sigma),
            "x0": stats_of(x0),
            "x_real": stats_of(x_real),
        }
        dsm = self.fake.dsm_weight(sigma) * (d[: len(x0)] - x0).square().flatten(1).sum(1)
        return dsm, logits

    def fake_update(self, draws: IterationDraws, j: int) -> dict[str, torch.Tensor]:
        rows_list = self.batching.micro_rows()
        loss_sum = torch.zeros((), device=self.device)
        stats: dict[str, torch.Tensor] = {}
        for m, rows in enumerate(rows_list):
            with no_sync(self.training.fake_ddp, m == len(rows_list) - 1):
                per_sample, st = self.critic_loss(draws, j, rows)
                loss = per_sample.sum() / self.batching.local_size
                loss.backward()
            loss_sum = loss_sum + loss.detach()
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v.detach() / len(rows_list)
        # Report the per-pixel loss (the optimized sum over pixels divided by their count).
        numel = math.prod(self.img_shape)
        out = self.optimizer_step(
            "fake", self.opt_fake, self.fake.parameters(), self.recipe.optim.grad_clip_fake, loss_sum
        )
        out["loss/fake"] = out["loss/fake"] / numel
        out.update(stats)
        return out

    # -- generator ---------------------------------------------------------------------------------
    def generator_inputs(self, draws: IterationDraws, rows: slice):
        """(sigma, labels, z, eps) of one micro-batch. EMD and Diff-Instruct draw them from the same
        streams, so at a fixed seed both methods see the same chains (the K = 1 identity relies on it)."""
        return self.draw_inputs(draws, "gen", self.recipe.method.noise_levels, rows, noise="eps")

    def generator_direction(self, draws: IterationDraws, rows: slice):
        """Return (x0 = g(z) with grad, direction d, weight w [N], stats) for one micro-batch."""
        raise NotImplementedError

    def generator_gradients(self, draws: IterationDraws) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Accumulate the generator's gradient over this rank's micro-batches (no optimizer step)."""
        rows_list = self.batching.micro_rows()
        loss_sum = torch.zeros((), device=self.device)
        stats: dict[str, torch.Tensor] = {}
        for m, rows in enumerate(rows_list):
            with no_sync(self.training.generator_ddp, m == len(rows_list) - 1):
                x0, d, w, st = self.generator_direction(draws, rows)
                if self.pin_level:
                    level = d.mean(dim=(-2, -1), keepdim=True)
                    # How much of the direction was a level push (rms over rms), for metrics.jsonl.
                    st = {**st, "gen/level_share": level.square().mean().sqrt() / d.square().mean().sqrt()}
                    d = d - level
                target = (x0.detach() + d).detach()
                per_sample = 0.5 * w * (x0 - target).square().flatten(1).sum(1)
                loss = per_sample.sum() / self.batching.local_size
                loss.backward()
            loss_sum = loss_sum + loss.detach()
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v.detach() / len(rows_list)
            self.last_diagnostics = {
                "stage": "generator",
                "x0": stats_of(x0),
                "direction": stats_of(d),
                "weight": stats_of(w),
            }
        return loss_sum, stats

    def generator_update(self, draws: IterationDraws) -> dict[str, torch.Tensor]:
        loss_sum, stats = self.generator_gradients(draws)
        out = self.optimizer_step(
            "gen", self.opt_gen, self.generator.parameters(), self.recipe.optim.grad_clip_gen, loss_sum
        )
        out.update(stats)
        return out

    def weight(self, sigma, x0=None, d_teacher=None) -> torch.Tensor:
        return diffusion.generator_weight(self.recipe.method.weighting, sigma, x0, d_teacher)

    # -- outputs ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_seeds(self, seeds: list[int], use_ema: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen = self.generator_ema if use_ema else self.generator
        rng = PerSeedRandom(seeds, self.device)
        z, idx = rng.latents_and_indices(self.img_shape, self.conditions.count)
        labels = None if idx is None else self.conditions(idx)
        return gen.sample(z, labels, rng=rng), labels

    def nonfinite_state(self) -> str | None:
        """Also the generators' samples on fixed seeds: weights can be finite yet so large that
        every sample overflows (seen at lr 1e6)."""
        bad = super().nonfinite_state()
        if bad is not None:
            return bad
        for use_ema, name in ((True, "generator_ema"), (False, "generator")):
            x, _ = self.sample_seeds(list(range(8)), use_ema=use_ema)
            if not bool(torch.isfinite(x).all()):
                return f"{name} gives non-finite samples"
        return None

    def preview(self, path: Path) -> None:
        from .. import plots

        n = self.recipe.logging.grid_size
        if len(self.img_shape) == 3:
            x, _ = self.sample_seeds(list(range(n)))
            plots.save_image_grid(self.teacher_info.decode(x) if self.teacher_info.decode else x, path)
        else:
            x, _ = self.sample_seeds(list(range(max(n, 2000))))
            mix = self.teacher_info.mixture
            ref = mix.sample(2000, torch.Generator().manual_seed(0)) if mix else None
            plots.save_scatter(x.cpu(), path, reference=ref, means=mix.means if mix else None)

    def evaluate(self, n: int) -> dict:
        """Mode metrics of the EMA generator on seeds 0..n-1, computed as `emdctl evaluate modes RUN
        --n n` computes them. Mixture teachers only (the recipe validation says so)."""
        from ..evaluation.mixture import generator_mode_metrics

        _, m = generator_mode_metrics(
            self.generator_ema, self.teacher_info.mixture, list(range(n)), self.device, refuse_nonfinite=False
        )
        return {k: v for k, v in m.items() if isinstance(v, int | float)}

    def export(self, directory: Path, use_ema: bool = True) -> Path:
        gen = self.generator_ema if use_ema else self.generator
        extra = {"teacher": self.teacher_info.describe(), "method": self.recipe.method.name, "ema": use_ema}
        return gen.save_pretrained(directory, self.data_info(), extra)
