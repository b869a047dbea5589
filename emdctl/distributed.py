"""Multi-process training with torchrun: NCCL on GPUs, gloo on CPUs.

`torchrun --nproc_per_node=8 -m emdctl distill RECIPE` runs one process per GPU. The global batch is
split evenly over ranks; every random tensor is drawn for the global batch and sliced (see rng.py),
so the result equals a single-process run. Rank 0 writes checkpoints, metrics and images.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (used for stop requests)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device: 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init(device_name: str = "auto") -> DistContext:
    """Initialize from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(synchronize: bool = False) -> None:
    """Tear down the process group; `synchronize` first waits for every rank (see `session`)."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str = "auto"):
    """`init`, then the teardown on leaving. On a normal exit every rank waits for the others first,
    so that no rank closes its connections while another still uses them (seen with gloo: the other
    rank aborted with 'terminate called without an active exception'); after an error it tears down
    at once, since the other ranks may never arrive."""
    ctx = init(device_name)
    try:
        yield ctx
    except BaseException:
        shutdown()
        raise
    shutdown(synchronize=True)
