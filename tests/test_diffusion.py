"""Diffusion math against exact references: preconditioning, VP<->EDM, mixtures, samplers."""

from __future__ import annotations

import math

import pytest
import torch

from emdctl import diffusion
from emdctl.networks import build_denoiser
from emdctl.recipe import NoiseLevels
from emdctl.rng import PerSeedRandom
from emdctl.solvers import edm_sampler
from emdctl.teachers.mixture import GaussianMixture, MixtureDenoiser, preset_mixture

from .conftest import fresh


def test_edm_coefficients_algebra():
    g = fresh()
    sigma = torch.rand(100, generator=g, dtype=torch.float64) * 80 + 1e-3
    sd = 0.5
    c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(sigma, sd)
    # EDM Appendix B.6: unit-variance network input, and the effective training target
    # (y - c_skip (y + n)) / c_out has unit variance for data of std sigma_data.
    assert torch.allclose(c_in.square() * (sd**2 + sigma.square()), torch.ones_like(sigma))
    target_var = ((1 - c_skip).square() * sd**2 + c_skip.square() * sigma.square()) / c_out.square()
    assert torch.allclose(target_var, torch.ones_like(sigma))
    # c_out is the minimal error scale: c_skip^2 sigma^2 + (1 - c_skip)^2 sd^2 = c_out^2.
    assert torch.allclose(c_skip.square() * sigma.square() + (1 - c_skip).square() * sd**2, c_out.square())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # lambda(sigma) = 1 / c_out^2
    assert torch.allclose(diffusion.edm_loss_weight(sigma, sd), 1 / c_out.square())


def test_vp_edm_round_trip():
    g = fresh()
    alpha_bar = torch.rand(50, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = torch.randn(50, 3, generator=g, dtype=torch.float64)
    x_s, sigma = diffusion.vp_to_edm(x_t, alpha_bar[:, None])
    # same SNR: alpha_bar / (1 - alpha_bar) = 1 / sigma^2
    assert torch.allclose(alpha_bar / (1 - alpha_bar), 1 / sigma[:, 0].square())
    back, ab = diffusion.edm_to_vp(x_s, sigma)
    assert torch.allclose(back, x_t) and torch.allclose(ab, alpha_bar[:, None])


def test_linear_schedule_matches_the_ddpm_definition():
    ab = diffusion.linear_beta_alpha_bar(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref = torch.tensor([torch.prod(1 - betas[: i + 1]).item() for i in range(0, 1000, 97)], dtype=torch.float64)
    assert torch.allclose(ab[::97], ref, rtol=1e-12)
    sig = diffusion.vp_sigma_from_alpha_bar(ab)
    assert abs(float(sig[0]) - math.sqrt(1e-4 / (1 - 1e-4))) < 1e-12 and sig.diff().min() > 0


@pytest.mark.parametrize("dist", ["lognormal", "loguniform", "karras"])
def test_sample_sigma_ranges(dist):
    lv = NoiseLevels(dist=dist, sigma_min=0.01, sigma_max=10)
    g = fresh()
    u = torch.randn(10000, generator=g) if dist == "lognormal" else torch.rand(10000, generator=g)
    s = diffusion.sample_sigma(lv, u)
    assert s.min() >= 0.01 - 1e-7 and s.max() <= 10 + 1e-5
    if dist == "loguniform":  # log sigma uniform: mean of log is the midpoint, sd is width / sqrt(12)
        width = math.log(10) - math.log(0.01)
        se = width / math.sqrt(12 * len(u))  # of the mean; 5 SE: a false failure about once in 2 million
        assert abs(float(s.log().mean()) - (math.log(0.01) + math.log(10)) / 2) < 5 * se
        assert abs(float(s.log().std()) - width / math.sqrt(12)) < 0.05 * width / math.sqrt(12)


def test_karras_schedule_endpoints():
    t = diffusion.karras_schedule(18, 0.002, 80, 7)
    assert len(t) == 19 and float(t[0]) == pytest.approx(80) and float(t[-2]) == pytest.approx(0.002)
    assert float(t[-1]) == 0 and (t[:-1].diff() < 0).all()


# --------------------------------------------------------------------------------------------
# Gaussian mixtures: exact score against autograd of the exact log-density, in float64


def random_mixture(g, k=4, d=3):
    return GaussianMixture(
        torch.rand(k, generator=g, dtype=torch.float64) + 0.1,
        torch.randn(k, d, generator=g, dtype=torch.float64) * 2,
        torch.rand(k, generator=g, dtype=torch.float64) * 0.5 + 0.1,
    )


@pytest.mark.parametrize("trial", range(3))
def test_mixture_score_matches_autograd(trial):
    g = fresh()
    mix = random_mixture(g, k=3 + trial, d=2 + trial)
    sigma = torch.rand(64, generator=g, dtype=torch.float64) * 3 + 0.01
    x = mix.sample(64, g) + sigma[:, None] * torch.randn(64, mix.dim, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    assert torch.allclose(mix.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-9)


def test_mixture_log_prob_normalized_1d():
    mix = GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [0.4, 0.8])
    xs = torch.linspace(-40, 40, 80001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 0.5, 3.0):
        integral = torch.trapezoid(mix.log_prob(xs, sigma).exp(), xs[:, 0])
        assert abs(float(integral) - 1) < 1e-8


def test_mixture_denoiser_is_tweedie_mean():
    """D(x; sigma) = E[x0 | x], checked by Monte Carlo over the joint (x0, x) in 1-D bins."""
    g = fresh(0)
    mix = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
    sigma = 0.5
    x0 = mix.sample(400000, g)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    bins = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (x[:, 0] >= lo) & (x[:, 0] < hi)
        centre = x[m]
        assert abs(float(x0[m].mean()) - float(mix.denoise(centre, sigma).mean())) < 0.01


def test_mixture_covariance_formula():
    g = fresh(1)
    mix = random_mixture(g, k=3, d=2)
    s = mix.sample(400000, g)
    assert torch.allclose(torch.cov(s.T), mix.covariance(), atol=0.05)
    assert torch.allclose(s.mean(0), mix.mean(), atol=0.02)


def test_mixture_transform_has_the_mixture_law():
    """transform(u, noise) with u uniform and noise normal: component k with probability w_k, and
    within it N(mu_k, s_k^2 I) (random weights and scales; means 20 apart, so the nearest mean
    names the component)."""
    g = fresh()
    k, n = 3, 400000
    means = torch.randn(k, 2, generator=g, dtype=torch.float64) + torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    mix = GaussianMixture(
        torch.rand(k, generator=g, dtype=torch.float64) + 0.1,
        means,
        torch.rand(k, generator=g, dtype=torch.float64) + 0.1,
    )
    x = mix.transform(
        torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    )
    comp = torch.cdist(x, mix.means).argmin(1)
    freq = torch.bincount(comp, minlength=k).double() / n
    assert (freq - mix.weights).abs().max() < 5 * (0.25 / n) ** 0.5
    for j in range(k):
        xs = x[comp == j]
        assert (xs.mean(0) - mix.means[j]).abs().max() < 5 * mix.scales[j] / len(xs) ** 0.5
        assert abs(float(xs.std(0).mean() / mix.scales[j]) - 1) < 0.02


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_heun_on_the_exact_mixture_reproduces_its_moments(solver):
    mix = GaussianMixture(**preset_mixture("ring8-unequal"))
    den = MixtureDenoiser(mix)
    seeds = list(range(4000))
    rng = PerSeedRandom(seeds)
    x = edm_sampler(
        den,
        rng.randn((2,)),
        None,
        rng,
        num_steps=40 if solver == "heun" else 200,
        solver=solver,
        sigma_min=0.002,
        sigma_max=80,
    )
    assert torch.allclose(x.mean(0), mix.mean(), atol=0.08)
    assert torch.allclose(torch.cov(x.T), mix.covariance(), atol=0.12)
    # ... and its mode weights (the reference any distillation is measured against).
    mass = torch.bincount(mix.responsibilities(x).argmax(1), minlength=8).double() / len(x)
    assert (mass - mix.weights).abs().max() < 0.03


def test_churn_sampler_needs_and_uses_per_seed_noise():
    mix = GaussianMixture(**preset_mixture("ring8"))
    den = MixtureDenoiser(mix)
    rng = PerSeedRandom([1, 2, 3])
    lat = rng.randn((2,))
    with pytest.raises(ValueError):
        edm_sampler(den, lat, None, None, num_steps=10, S_churn=40)
    a = edm_sampler(den, lat, None, PerSeedRandom([1, 2, 3]), num_steps=10, S_churn=40)
    b = edm_sampler(den, lat[1:], None, PerSeedRandom([2, 3]), num_steps=10, S_churn=40)
    assert torch.allclose(a[1:], b)  # per-seed noise: independent of what else is in the batch


def test_edm_precond_with_zero_network_is_c_skip():
    cfg = {
        "precond": "edm",
        "precond_kwargs": {"sigma_data": 0.5},
        "img_shape": [3],
        "label_dim": 0,
        "arch": "mlp",
        "arch_kwargs": {"hidden": 8, "layers": 1, "emb_dim": 8},
    }
    den = build_denoiser(cfg).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.rand(5, dtype=torch.float64) + 0.1
    c_skip = 0.25 / (sigma.square() + 0.25)
    assert torch.allclose(den(x, sigma), c_skip[:, None] * x)  # the MLP's output layer starts at zero
