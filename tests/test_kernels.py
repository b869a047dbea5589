"""The fused Langevin update (Triton) against the eager float64 reference, on fresh random inputs.

Runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1), in a subprocess so that the
interpreter setting cannot leak into other tests; where a CUDA device is present, also compiled for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import math, sys, torch
    from emdctl.kernels import fused_eps_update

    dev = sys.argv[1]
    g = torch.Generator()
    g.seed()  # fresh inputs every run
    for prior_pull in (True, False):
        n, shape, gamma = 5, (3, 7, 9), 0.137
        d_t, d_f, eps, led, noise = (torch.randn(n, *shape, generator=g).to(dev) for _ in range(5))
        sigma = (torch.rand(n, generator=g) * 5 + 0.05).to(dev)
        s = sigma.double().reshape(-1, 1, 1, 1)
        sdelta = (d_t.double() - d_f.double()) / s
        drift = gamma * (sdelta - eps.double())
        eps_ref = eps.double() + drift + math.sqrt(2 * gamma) * noise.double()
        led_ref = led.double() + (drift if prior_pull else gamma * sdelta)

        e, l, drift_rms, sdelta_rms = fused_eps_update(d_t.clone(), d_f.clone(), eps.clone(), led.clone(), sigma,
                                                      gamma, prior_pull, seed=1, noise=noise)
        assert torch.allclose(e.double(), eps_ref, rtol=1e-5, atol=1e-5), (e.double() - eps_ref).abs().max()
        assert torch.allclose(l.double(), led_ref, rtol=1e-5, atol=1e-5)
        assert abs(float(drift_rms) - float(drift.square().mean().sqrt())) < 1e-4 * (1 + float(drift_rms))
        assert abs(float(sdelta_rms) - float(sdelta.square().mean().sqrt())) < 1e-4 * (1 + float(sdelta_rms))

        # Generated (Philox) noise: the implied noise is standard normal, deterministic in the seed, and
        # counter-based: rows [2, 5) computed alone draw exactly what they draw inside the full batch.
        args = (sigma, gamma, prior_pull)
        e1, l1, _, _ = fused_eps_update(d_t.clone(), d_f.clone(), eps.clone(), led.clone(), *args, 99)
        e2, _, _, _ = fused_eps_update(d_t.clone(), d_f.clone(), eps.clone(), led.clone(), *args, 99)
        assert torch.equal(e1, e2)
        assert torch.allclose(l1.double(), led_ref, rtol=1e-5, atol=1e-5)  # the ledger carries no noise
        implied = (e1.double() - eps.double() - drift) / math.sqrt(2 * gamma)
        assert abs(float(implied.mean())) < 0.15 and abs(float(implied.std()) - 1) < 0.15
        part, _, _, _ = fused_eps_update(d_t[2:].clone(), d_f[2:].clone(), eps[2:].clone(), led[2:].clone(),
                                         sigma[2:], gamma, prior_pull, 99, row_offset=2)
        assert torch.allclose(part, e1[2:], atol=1e-6)
        e3, _, _, _ = fused_eps_update(d_t.clone(), d_f.clone(), eps.clone(), led.clone(), sigma, gamma, prior_pull, 98)
        assert not torch.allclose(e3, e1)
    print("kernel ok")
    """
)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="no CUDA device"))],
)
@pytest.mark.slow
def test_fused_update_matches_float64_reference(device):
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", SCRIPT, device], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "kernel ok" in res.stdout


def test_fused_update_is_only_offered_on_cuda():
    import torch

    from emdctl import kernels

    assert kernels.available(torch.device("cpu")) is False
