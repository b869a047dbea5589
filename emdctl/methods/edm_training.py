"""EDM teacher training (Karras et al. 2022): `emdctl teacher train RECIPE`.

Loss lambda(sigma) ||D(x + sigma n; sigma) - x||^2 with ln(sigma) ~ N(P_mean, P_std^2), EDM
preconditioning, optional class conditioning and horizontal flips, learning-rate warm-up counted in
images, EMA, on the shared trainer (auto-resume, bf16, DDP, progress).

Data order is a function of (seed, global sample number): sample g of the run is element g mod N
of the permutation drawn for epoch g // N. Any rank, micro-batch or resumed run therefore sees
exactly the images an uninterrupted single-process run would. Images stream from disk through a
DataLoader with worker processes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..data import IterationLoader, open_dataset
from ..errors import UserError
from ..memory import check_fits
from ..networks import build_denoiser, preset_config
from ..networks.precond import Denoiser
from ..precision import apply_policy, compile_for
from ..rng import PerSeedRandom, derive_seed
from ..solvers import edm_sampler
from ..teachers import save_pretrained_denoiser
from .base import Method, make_adam, no_sync, stats_of, wrap_ddp


class TeacherTraining(Method):
    """What every teacher training shares: one network and its EMA, DDP, Adam with a warm-up counted
    in images, the dataset in the order fixed by (seed, sample number). Subclasses build the network
    (`start`) and define the loss (`train_step`)."""

    def start(self, net: Denoiser, dataset) -> None:
        r, prec = self.recipe, self.recipe.precision
        apply_policy(net, prec.dtype, prec.channels_last, prec.checkpointing)
        self.net = net.to(self.device).train()
        self.net_ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.net_ddp = wrap_ddp(self.net, self.dist)
        self.net_fn = compile_for(self.net_ddp, prec, self.device)
        o = r.optim
        self.opt = make_adam(self.net.parameters(), o.lr, o.betas, o.eps, 0.0, self.device)
        self.loader = IterationLoader(dataset, r.seed, self.batching, self.device, r.data.xflip, "data/xflip")

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "net_ema": self.net_ema}

    def optimizers(self):
        return {"net": self.opt}

    def ema_pairs(self):
        return [(self.net_ema, self.net)]

    def initialize(self) -> None:
        pass  # fresh weights: the architecture's own initialization, seeded when built

    def set_learning_rate(self, iteration: int) -> None:
        o = self.recipe.optim
        images = iteration * self.recipe.batch.size
        lr = o.lr * min(images / max(o.warmup, 1e-8), 1.0) if o.warmup else o.lr
        for g in self.opt.param_groups:
            g["lr"] = lr

    def denoising_step(self, iteration: int, noise_inputs) -> dict[str, torch.Tensor]:
        """One optimizer step of sum_i w(sigma_i) ||D(x0_i + sigma_i n_i; sigma_i, c_i) - x0_i||^2 over
        this rank's micro-batches; noise_inputs(draws, x0, y, rows) -> (sigma, noise, conditioning)."""
        self.set_learning_rate(iteration)
        draws = self.draws(iteration)
        loss_sum = torch.zeros((), device=self.device)
        rows_list = self.batching.micro_rows()
        for m, (rows, (x0, y)) in enumerate(zip(rows_list, self.loader.images(iteration, draws), strict=True)):
            sigma, noise, cond = noise_inputs(draws, x0, y, rows)
            with no_sync(self.net_ddp, m == len(rows_list) - 1):
                d = self.net_fn(x0 + sigma[:, None, None, None] * noise, sigma, cond)
                per_sample = self.net.dsm_weight(sigma) * (d - x0).square().flatten(1).sum(1)
                loss = per_sample.sum() / self.batching.local_size
                loss.backward()
            loss_sum = loss_sum + loss.detach()
            self.last_diagnostics = {"stage": "teacher", "sigma": stats_of(sigma), "x0": stats_of(x0), "d": stats_of(d)}
        # nan_to_num on gradients, as EDM does, is deliberately absent: non-finite values stop the run.
        out = self.optimizer_step("net", self.opt, self.net.parameters(), self.recipe.optim.grad_clip, loss_sum)
        out["loss/net"] = out["loss/net"] / math.prod(self.img_shape)
        return out


class EDMTeacherTraining(TeacherTraining):
    name = "edm-teacher"

    def __init__(self, recipe, dist):
        super().__init__(recipe, dist)
        d = recipe.data
        self.dataset = open_dataset(d.path, d.format, d.labels, d.max_images, d.resolution)
        self.img_shape = self.dataset.shape()
        if d.labels and self.dataset.labels is None:
            raise UserError(f"{d.path}: data.labels is true but the dataset has no labels")
        self.label_dim = self.dataset.num_classes if d.labels else 0
        net_cfg = recipe.network
        cfg = preset_config(
            net_cfg.arch, net_cfg.precond, self.img_shape, self.label_dim, net_cfg.kwargs, net_cfg.sigma_data
        )
        prec = recipe.precision
        # network, EMA, gradients and two Adam moments: refused before allocation when they cannot fit
        check_fits(cfg, 5, self.batching.micro, prec.dtype, prec.checkpointing, self.device, "network.kwargs")
        torch.manual_seed(derive_seed(recipe.seed, "init"))  # fresh weights are a function of the seed
        try:
            net = build_denoiser(cfg)
        except (TypeError, ValueError) as e:
            raise UserError(f"network: cannot build {net_cfg.arch} for {self.img_shape} images ({e})") from None
        self.start(net, self.dataset)

    def configs(self) -> dict:
        return {"net": self.net.config(), "dataset": str(self.recipe.data.path)}

    def train_step(self, iteration: int) -> dict[str, torch.Tensor]:
        """EDM's loss: ln(sigma) ~ N(P_mean, P_std^2), weight lambda(sigma)."""
        r = self.recipe
        n, shape = self.batching.global_size, (self.batching.global_size, *self.img_shape)

        def inputs(draws, x0, y, rows):
            labels = torch.nn.functional.one_hot(y, self.label_dim).float() if self.label_dim else None
            sigma = (draws.normal("edm/sigma", (n,), rows) * r.loss.p_std + r.loss.p_mean).exp()
            return sigma, draws.normal("edm/noise", shape, rows), labels

        return self.denoising_step(iteration, inputs)

    # -- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, path: Path) -> None:
        from ..plots import save_image_grid

        seeds = list(range(self.recipe.logging.grid_size))
        rng = PerSeedRandom(seeds, self.device)
        z, labels = rng.latents_and_labels(self.img_shape, self.label_dim)
        x = edm_sampler(self.net_ema, z, labels, rng, num_steps=18, dtype=torch.float32)
        save_image_grid(x, path)

    def export(self, directory: Path, use_ema: bool = True) -> Path:
        net = self.net_ema if use_ema else self.net
        extra = {
            "trained_on": str(self.recipe.data.path),
            "ema": use_ema,
            "data": {"kind": "image", "range": [-1.0, 1.0]},
        }
        return save_pretrained_denoiser(net, directory, extra)
