"""Random numbers with a fixed discipline, so that results are functions of seeds.

Two rules:

* Sampling: every image is a function of its own seed. Latents and per-step noise come from one
  CPU `torch.Generator` per seed (then move to the device), so the pixels do not depend on the
  batch size, the number of GPUs, or even the device type.
* Training: every random tensor of iteration n is drawn for the *global* batch from a generator
  seeded by (recipe seed, n, stream name) and then sliced to this rank's / micro-batch's rows.
  Results therefore do not depend on the world size or on micro-batching, and a resumed run needs
  no saved RNG state: the iteration counter is the state.
"""

from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from integers and strings (strings hashed with CRC32, stable across runs)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        v = zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & _MASK64
        h = _splitmix64(h ^ v)
    return h & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class IterationDraws:
    """The random numbers of one training iteration (see the module docstring)."""

    def __init__(self, seed: int, iteration: int, device: torch.device):
        self.seed = seed
        self.iteration = iteration
        self.device = torch.device(device)

    def _gen(self, stream: str) -> torch.Generator:
        return _generator(derive_seed(self.seed, self.iteration, stream), self.device)

    def normal(self, stream: str, shape: tuple[int, ...], rows: slice | None = None) -> torch.Tensor:
        x = torch.randn(shape, generator=self._gen(stream), device=self.device, dtype=torch.float32)
        return x if rows is None else x[rows].clone()

    def uniform(self, stream: str, shape: tuple[int, ...], rows: slice | None = None) -> torch.Tensor:
        x = torch.rand(shape, generator=self._gen(stream), device=self.device, dtype=torch.float32)
        return x if rows is None else x[rows].clone()

    def integers(self, stream: str, high: int, n: int, rows: slice | None = None) -> torch.Tensor:
        x = torch.randint(high, (n,), generator=self._gen(stream), device=self.device)
        return x if rows is None else x[rows].clone()


class PerSeedRandom:
    """One CPU generator per seed (EDM's `StackedRandomGenerator` idea): row i is a function of seeds[i]."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu", raw: bool = False):
        """raw: each seed's generator is torch.Generator().manual_seed(seed) itself, as diffusers
        pipelines seed theirs (students of diffusers teachers: the same seed gives the same latent)."""
        self.device = torch.device(device)
        self.generators = [_generator(int(s) if raw else derive_seed(int(s), "sample"), torch.device("cpu"))
                           for s in seeds]  # fmt: skip

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        rows = [torch.randint(high, (1,), generator=g) for g in self.generators]
        return torch.cat(rows).to(self.device)

    def latents_and_indices(
        self, shape: tuple[int, ...], count: int, fixed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every sampler's first draws, in this order: the unit-noise latent of each seed, then (for
        a conditional model) the index of its condition (class or prompt) among `count`; `fixed`
        fixes the index instead."""
        z = self.randn(shape)
        if not count:
            return z, None
        idx = self.randint(count) if fixed is None else torch.full((len(self.generators),), fixed)
        return z, idx.to(self.device)

    def latents_and_labels(
        self, shape: tuple[int, ...], label_dim: int, class_label: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latents_and_indices with the class as a one-hot label."""
        z, idx = self.latents_and_indices(shape, label_dim, class_label)
        return z, None if idx is None else torch.nn.functional.one_hot(idx, label_dim).float()
