"""What every training method shares: batching, optimizer steps with guards, and the interface the
trainer drives (emdctl.trainer).

A method owns its networks and optimizers. `train_step(iteration)` does one iteration on this
rank's share of the global batch, split into micro-batches whose gradients accumulate; all random
numbers come from `rng.IterationDraws` (global batch, sliced), so the result does not depend on
the number of ranks or micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..distributed import DistContext
from ..errors import UserError
from ..rng import IterationDraws
from ..storage import first_nonfinite


class NonFiniteError(Exception):
    """A loss or gradient norm is NaN/inf; raised before the optimizer step that would use it."""

    def __init__(self, quantity: str, value: float, diagnostics: dict):
        super().__init__(f"{quantity} is {value}")
        self.quantity = quantity
        self.value = value
        self.diagnostics = diagnostics


@dataclass
class Batching:
    global_size: int
    rank: int
    world: int
    micro: int

    @classmethod
    def from_recipe(cls, batch, dist: DistContext) -> Batching:
        if batch.size % dist.world_size:
            raise UserError(
                f"batch.size ({batch.size}) must be divisible by the number of processes ({dist.world_size})"
            )
        local = batch.size // dist.world_size
        micro = batch.micro or local
        if local % micro:
            raise UserError(f"batch.micro ({micro}) must divide the per-process batch ({local})")
        return cls(batch.size, dist.rank, dist.world_size, micro)

    @property
    def local_size(self) -> int:
        return self.global_size // self.world

    def micro_rows(self) -> list[slice]:
        """Global row ranges of this rank's micro-batches."""
        start = self.rank * self.local_size
        return [slice(start + m, start + m + self.micro) for m in range(0, self.local_size, self.micro)]


def make_adam(params, lr, betas, eps, weight_decay, device, decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (L2 weight decay) or, decoupled, AdamW."""
    fused = torch.device(device).type == "cuda"
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


def decay_factor(decay, images: int, duration: int, warmup: int = 0) -> float:
    """The learning-rate multiplier after `images` images: a linear rise over the first `warmup`
    images; 1 until decay.start, then a cosine (or a line) down to decay.final at `duration`."""
    if warmup and images < warmup:
        return images / warmup
    if decay is None or images <= decay.start:
        return 1.0
    u = min((images - decay.start) / (duration - decay.start), 1.0)
    fall = 0.5 * (1 - math.cos(math.pi * u)) if decay.shape == "cosine" else u
    return 1.0 - (1.0 - decay.final) * fall


def wrap_ddp(module: nn.Module, dist: DistContext) -> nn.Module:
    if not dist.enabled:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def no_sync(module: nn.Module, last: bool):
    """Skip DDP's all-reduce on all but the last micro-batch."""
    if isinstance(module, DDP) and not last:
        return module.no_sync()
    return contextlib.nullcontext()


def stats_of(t: torch.Tensor) -> dict:
    t = t.detach().float()
    finite = torch.isfinite(t)
    return {
        "shape": list(t.shape),
        "finite_fraction": float(finite.float().mean()),
        "mean": float(t[finite].mean()) if finite.any() else None,
        "std": float(t[finite].std()) if finite.sum() > 1 else None,
        "min": float(t[finite].min()) if finite.any() else None,
        "max": float(t[finite].max()) if finite.any() else None,
    }


class Method:
    """Interface the trainer drives; see DistillationMethod and EDMTeacherTraining."""

    name = "?"
    # The metrics.jsonl keys (by prefix) drawn in curves.png; each method adds its own.
    plotted: tuple[str, ...] = ("loss/", "grad_norm/", "eval/")

    def __init__(self, recipe, dist: DistContext):
        self.recipe = recipe
        self.dist = dist
        self.device = dist.device
        self.batching = Batching.from_recipe(recipe.batch, dist)
        self.last_diagnostics: dict = {}

    # -- to implement ------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def shared_with_teacher(self) -> frozenset:
        """data_ptrs of the frozen teacher tensors the trained networks hold as their own (LoRA
        students' base): checkpoints leave them out, as the teacher brings them back."""
        return frozenset()

    def initialize(self) -> None:
        raise NotImplementedError

    def train_step(self, iteration: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def preview(self, path: Path) -> None:
        raise NotImplementedError

    def export(self, directory: Path, use_ema: bool = True) -> Path:
        raise NotImplementedError

    def configs(self) -> dict:
        return {}

    def evaluate(self, n: int) -> dict:
        """Scalar metrics of the current (EMA) model from n fixed seeds (`logging.eval_every`)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def draws(self, iteration: int) -> IterationDraws:
        return IterationDraws(self.recipe.seed, iteration, self.device)

    def optimizer_step(self, name: str, opt: torch.optim.Optimizer, params, clip: float, loss: torch.Tensor) -> dict:
        """Clip, check finiteness of the loss and gradient norm, then step. Raises NonFiniteError
        *before* stepping, so the parameters keep their last good values."""
        params = [p for p in params if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        loss_v, norm_v = float(loss), float(norm)
        if not math.isfinite(loss_v):
            raise NonFiniteError(f"loss/{name}", loss_v, self.last_diagnostics)
        if not math.isfinite(norm_v):
            raise NonFiniteError(f"grad_norm/{name}", norm_v, self.last_diagnostics)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # A finite gradient can still make non-finite weights (a huge learning rate): caught here,
        # so that no checkpoint ever holds them (the trainer stops; no step can be skipped back).
        weight_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in params]))))
        if not math.isfinite(weight_norm):
            raise NonFiniteError(f"weights/{name}", weight_norm, self.last_diagnostics)
        return {f"loss/{name}": loss.detach(), f"grad_norm/{name}": norm.detach()}

    def nonfinite_state(self) -> str | None:
        """What is not finite in the state a checkpoint would hold (None: all finite)."""
        for name, module in self.modules().items():
            key = first_nonfinite(module)
            if key is not None:
                return f"{name}.{key} holds NaN/inf"
        return None
