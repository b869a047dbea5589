"""Fused GPU kernel for the Langevin eps-update (Triton).

One pass reads D_teacher, D_fake, eps and the ledger and writes eps and the ledger:
    sdelta = (D_teacher - D_fake) / sigma             (sigma * Delta)
    drift  = gamma (sdelta - eps)
    ledger += drift            (or gamma * sdelta when the ledger drops the prior pull)
    eps    += drift + sqrt(2 gamma) xi,   xi = Philox normal(seed, global element index)
and accumulates the sums of drift^2 and sdelta^2 for the diagnostics. The eager update takes about
eight elementwise kernels and as many round trips through memory.

The noise is counter-based: element j of global batch row r gets randn(seed, r * numel + j), so a
rank or micro-batch that holds rows [r0, r1) draws exactly the numbers the full batch would.
(These are not the numbers torch.randn draws on the eager path: the fused path is its own,
equally deterministic, stream.) Offsets are 32-bit: the global batch must hold < 2^31 elements.

Triton runs on CUDA; with TRITON_INTERPRET=1 it also runs on CPU tensors, which is how the tests
check it against a float64 reference. Whether it pays is measured by `emdctl bench`.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def langevin_eps_update(
        dt_ptr,
        df_ptr,
        eps_ptr,
        ledger_ptr,
        sigma_ptr,
        noise_ptr,
        stats_ptr,
        numel_per_row,
        n_elements,
        gamma,
        noise_scale,
        seed,
        row_offset,
        PRIOR_PULL: tl.constexpr,
        GENERATE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        row = offs // numel_per_row
        s = tl.load(sigma_ptr + row, mask=mask, other=1.0)
        dt = tl.load(dt_ptr + offs, mask=mask, other=0.0)
        df = tl.load(df_ptr + offs, mask=mask, other=0.0)
        eps = tl.load(eps_ptr + offs, mask=mask, other=0.0)
        led = tl.load(ledger_ptr + offs, mask=mask, other=0.0)
        sdelta = (dt - df) / s
        drift = gamma * (sdelta - eps)
        if PRIOR_PULL:
            led = led + drift
        else:
            led = led + gamma * sdelta
        if GENERATE:
            xi = tl.randn(seed, offs + row_offset * numel_per_row)
        else:
            xi = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        tl.store(eps_ptr + offs, eps + drift + noise_scale * xi, mask=mask)
        tl.store(ledger_ptr + offs, led, mask=mask)
        drift = tl.where(mask, drift, 0.0)
        sdelta = tl.where(mask, sdelta, 0.0)
        tl.atomic_add(stats_ptr, tl.sum(drift * drift, axis=0))
        tl.atomic_add(stats_ptr + 1, tl.sum(sdelta * sdelta, axis=0))

    return triton, langevin_eps_update


def fused_eps_update(
    d_teacher: torch.Tensor,
    d_fake: torch.Tensor,
    eps: torch.Tensor,
    ledger: torch.Tensor,
    sigma: torch.Tensor,
    gamma: float,
    prior_pull: bool,
    seed: int,
    row_offset: int = 0,
    noise: torch.Tensor | None = None,
    block: int = 1024,
):
    """Update eps and the ledger in place (float32). Returns (eps, ledger, drift_rms, sdelta_rms).

    With `noise` given, it is used instead of the kernel's own Philox draws (for testing)."""
    triton, kernel = _kernel()
    for name, t in (("d_teacher", d_teacher), ("d_fake", d_fake), ("eps", eps), ("ledger", ledger)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    n = eps.numel()
    per_row = n // eps.shape[0]
    if (row_offset + eps.shape[0]) * per_row >= 2**31:
        raise ValueError("the fused Langevin update supports global batches of fewer than 2^31 elements")
    stats = torch.zeros(2, device=eps.device, dtype=torch.float32)
    sig = sigma.to(torch.float32).contiguous()
    noise_arg = noise.to(torch.float32).contiguous() if noise is not None else eps
    grid = (triton.cdiv(n, block),)
    kernel[grid](
        d_teacher,
        d_fake,
        eps,
        ledger,
        sig,
        noise_arg,
        stats,
        per_row,
        n,
        float(gamma),
        math.sqrt(2 * gamma),
        int(seed) & 0x7FFFFFFF,
        int(row_offset),
        PRIOR_PULL=bool(prior_pull),
        GENERATE=noise is None,
        BLOCK=block,
    )
    return eps, ledger, (stats[0] / n).sqrt(), (stats[1] / n).sqrt()


def available(device: torch.device) -> bool:
    """The fused kernel needs a CUDA device and Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
