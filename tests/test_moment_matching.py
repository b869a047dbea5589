"""Moment Matching (alternating, one step) against its definition (ALGORITHMS.md, section 3)."""

from __future__ import annotations

import pytest
import torch

from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.methods import MomentMatching
from emdctl.methods.moment_matching import posterior_sample
from emdctl.recipe import parse_recipe
from emdctl.rng import IterationDraws
from emdctl.teachers import load_teacher

from .conftest import tiny_mixture_recipe


def build(seed=0, **overrides):
    data = tiny_mixture_recipe(
        **{
            "method": {
                "name": "moment-matching",
                "noise_levels": {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 2.5},
            },
            "fake_score.noise_levels": {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 2.5},
            "seed": seed,
            **overrides,
        }
    )
    recipe = parse_recipe(data, "test")
    m = MomentMatching(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
    m.initialize()
    return m


def generator_grad(m, iteration=0) -> torch.Tensor:
    m.opt_gen.zero_grad(set_to_none=True)
    m.generator_gradients(IterationDraws(m.recipe.seed, iteration, m.device))
    return torch.cat([p.grad.flatten() for p in m.generator.parameters()])


def test_posterior_sample_has_the_forward_process_joint_float64():
    """x fixed, z_t = x + t n, z_s ~ q(z_s | z_t, x): then z_s - x ~ N(0, s^2) and Cov(z_s, z_t) = s^2,
    i.e. (z_s, z_t) is distributed as the forward process at levels s and t (Monte Carlo, 5 SE)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n, d = 200_000, 3
    t = float(1 + 4 * torch.rand((), generator=g))
    s = float(t * (0.1 + 0.8 * torch.rand((), generator=g)))
    x = torch.randn(d, generator=g, dtype=torch.float64).expand(n, d)
    z_t = x + t * torch.randn(n, d, generator=g, dtype=torch.float64)
    z_s = posterior_sample(
        x, z_t, t, torch.full((n,), s, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    )
    a, b = z_s - x, z_t - x
    se = s * s * (2 / n) ** 0.5 * 3  # a generous standard error for second moments of these scales
    assert a.mean(0).abs().max() < 5 * s / n**0.5
    assert (a.square().mean(0) - s * s).abs().max() < 5 * se
    assert ((a * b).mean(0) - s * s).abs().max() < 5 * se * t / s
    # s = t: the posterior is the point z_t itself
    assert torch.equal(
        posterior_sample(
            x[:4], z_t[:4], t, torch.full((4,), t, dtype=torch.float64), torch.ones(4, d, dtype=torch.float64)
        ),
        z_t[:4],
    )


def test_generator_gradient_is_the_papers_loss_gradient():
    """The shared regression with d = (D_teacher - g_phi)(z_s) / s^2 and w = s^2 has the gradient of
    the paper's loss w(s) x~^T sg(g_phi(z_s) - D_teacher(z_s)), computed here directly."""
    m = build(**{"method.weighting": "uniform"})
    with torch.no_grad():  # an auxiliary denoiser that differs from the teacher
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = generator_grad(m)
    draws = IterationDraws(m.recipe.seed, 0, m.device)
    rows = m.batching.micro_rows()[0]
    z, labels, sigma, noise = m._re_noised(draws, "gen", m.recipe.method.noise_levels, rows)
    m.opt_gen.zero_grad(set_to_none=True)
    x = m.generator(z, labels)
    t = m.generator.sigma_star
    r = (sigma.square() / t**2)[:, None]
    z_s = x.detach() + r * (t * z - x.detach()) + sigma[:, None] * (1 - r).sqrt() * noise
    with torch.no_grad():
        mismatch = m.fake(z_s, sigma, labels) - m.teacher(z_s, sigma, labels)
    w = 1 / sigma.square()  # 'uniform' weighting of the score-unit direction
    (w[:, None] * x * mismatch).sum().div(len(z)).backward()
    want = torch.cat([p.grad.flatten() for p in m.generator.parameters()])
    assert want.norm() > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_zero_generator_gradient_while_the_auxiliary_denoiser_is_the_teacher():
    m = build()
    assert generator_grad(m).abs().max() > 0  # the fitted network is not the exact teacher
    m.fake_fn = m.teacher_fn
    assert generator_grad(m).abs().max() == 0


def test_auxiliary_loss_is_the_two_moment_regression():
    """One auxiliary step's loss equals w(s) (||x~ - g_phi||^2 + ||D_teacher - g_phi||^2) at z_s, recomputed."""
    m = build()
    draws = IterationDraws(m.recipe.seed, 3, m.device)
    rows = m.batching.micro_rows()[0]
    z, labels, sigma, noise = m._re_noised(draws, "mm-aux0", m.recipe.fake_score.noise_levels, rows)
    with torch.no_grad():
        x = m.generator(z, labels)
        t = m.generator.sigma_star
        z_s = posterior_sample(x, t * z, t, sigma, noise)
        g_phi, d_t = m.fake(z_s, sigma, labels), m.teacher(z_s, sigma, labels)
        per = m.fake.dsm_weight(sigma) * ((x - g_phi).square() + (d_t - g_phi).square()).sum(1)
        want = float(per.mean()) / x.shape[1]
    got = float(m.fake_update(draws, 0)["loss/fake"])
    assert got == pytest.approx(want, rel=1e-5)


def test_moment_matching_levels_above_sigma_star_are_refused():
    data = tiny_mixture_recipe(
        **{
            "method": {
                "name": "moment-matching",
                "noise_levels": {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 80.0},
            }
        }
    )
    with pytest.raises(
        UserError, match=r"method\.noise_levels\.sigma_max \(80\) must not exceed the generator's sigma\* \(2\.5\)"
    ):
        parse_recipe(data, "test")
    data["method"]["noise_levels"]["sigma_max"] = 2.5  # the fake score's default (lognormal up to 80) is next
    with pytest.raises(UserError, match=r"fake_score\.noise_levels\.sigma_max \(80\)"):
        parse_recipe(data, "test")


def test_distill_moment_matching_moves_mass_onto_the_modes(tmp_path):
    """`emdctl distill` end to end with method moment-matching on the 8 unequal Gaussians: the
    generator starts off the modes (it is the teacher's denoiser at sigma* = 2.5, which averages
    them) and a short run puts most of its mass on them, with every export in place."""
    import json

    import yaml
    from typer.testing import CliRunner

    from emdctl.cli import app

    levels = {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 2.5}
    data = tiny_mixture_recipe(
        **{
            "method": {"name": "moment-matching", "noise_levels": levels},
            "fake_score.noise_levels": levels,
            "teacher.network": {"hidden": 64, "layers": 3, "emb_dim": 32},
            "teacher.fit": {"steps": 300, "batch": 512},
            "batch.size": 256,
            "duration": "40k",
            "ema.halflife": "4k",
            "logging": {
                "every": 20480,
                "grid_every": "40k",
                "grid_size": 16,
                "progress": False,
                "eval_every": "40k",
                "eval_samples": 4000,
            },
            "checkpoint": {"every": "20k", "keep": 1},
        }
    )
    p = tmp_path / "mm.yaml"
    p.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["distill", str(p), "--runs-root", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/tv_distance" in r]
    first, last = evals[0], evals[-1]
    assert first["images"] == 0 and last["images"] >= 40_000
    assert first["eval/off_mode_fraction"] > 0.9
    assert last["eval/off_mode_fraction"] < 0.7 * first["eval/off_mode_fraction"]  # 1.0 -> 0.46 here
    assert last["eval/tv_distance"] < 0.5 * first["eval/tv_distance"]  # 0.13 -> 0.04 here
    assert (run / "generator" / "config.json").is_file()
    assert json.loads((run / "generator" / "config.json").read_text())["method"] == "moment-matching"
