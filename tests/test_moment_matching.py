"""Moment Matching (alternating; one step and few steps) against its definition (docs/algorithm.md, 'The baselines')."""

from __future__ import annotations

import json

import pytest
import torch

from emdctl import diffusion
from emdctl.checkpoint import CheckpointManager
from emdctl.commands.distill import run_recipe
from emdctl.diffusion import posterior_sample
from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.generator import SAMPLERS, few_step_states, load_generator
from emdctl.methods import MomentMatching
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


LEVELS = {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 2.5}


def build_k(steps: int, z_t: str = "student", seed: int = 0, **overrides):
    """A `steps`-step student on the tiny mixture."""
    return build(seed, **{"method": {"name": "moment-matching", "noise_levels": LEVELS, "steps": steps, "z_t": z_t},
                          **overrides})  # fmt: skip


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def generator_grad(m, iteration=0) -> torch.Tensor:
    m.opt_gen.zero_grad(set_to_none=True)
    draws = IterationDraws(m.recipe.seed, iteration, m.device)
    m.begin_iteration(draws, iteration)
    m.generator_gradients(draws)
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
    sigma, labels, z, noise = m.draw_inputs(draws, "gen", m.recipe.method.noise_levels, rows)
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


@pytest.mark.parametrize("steps", [1, 3])
def test_zero_generator_gradient_while_the_auxiliary_denoiser_is_the_teacher(steps):
    m = build_k(steps)
    assert generator_grad(m).abs().max() > 0  # the fitted network is not the exact teacher
    m.inference.fake = m.inference.teacher
    assert generator_grad(m).abs().max() == 0


def test_auxiliary_loss_is_the_two_moment_regression():
    """One auxiliary step's loss equals w(s) (||x~ - g_phi||^2 + ||D_teacher - g_phi||^2) at z_s, recomputed."""
    m = build()
    draws = IterationDraws(m.recipe.seed, 3, m.device)
    rows = m.batching.micro_rows()[0]
    sigma, labels, z, noise = m.draw_inputs(draws, "mm-aux0", m.recipe.fake_score.noise_levels, rows)
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
    data["method"]["noise_levels"]["sigma_max"] = 2.5
    assert parse_recipe(data, "test").fake_score.noise_levels.sigma_max == 2.5  # by default the method's levels
    data["fake_score"] = {"noise_levels": {"dist": "lognormal", "sigma_max": 80.0}}
    with pytest.raises(UserError, match=r"fake_score\.noise_levels\.sigma_max \(80\)"):
        parse_recipe(data, "test")


@pytest.mark.slow
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
    assert last["eval/tv_distance"] < 0.7 * first["eval/tv_distance"]  # 0.99 -> 0.58 here (strict mode mass)
    assert (run / "generator" / "config.json").is_file()
    assert json.loads((run / "generator" / "config.json").read_text())["method"] == "moment-matching"


# --------------------------------------------------------------------------------------------
# Few steps


def test_few_step_levels_are_edms_schedule_without_its_last_point():
    for k in range(1, 9):
        levels = diffusion.few_step_levels(k, 80.0, 0.002)
        want = diffusion.karras_schedule(k + 1, 0.002, 80.0)[:k]
        assert len(levels) == k and levels[0] == 80.0 and levels[-1] > 0.002
        assert torch.allclose(torch.tensor(levels, dtype=torch.float64), want, rtol=1e-12, atol=0)
        assert all(b < a for a, b in zip(levels, levels[1:], strict=False))
    # two steps from 80 take the second at ~2.5, not at sigma_min where a step does nothing
    assert diffusion.few_step_levels(2, 80.0, 0.002)[1] == pytest.approx(2.51, rel=0.01)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_few_step_states_are_the_written_out_steps_float64(kind):
    """Each state against the step written out by hand, with an exact Gaussian denoiser."""
    g = torch.Generator().manual_seed(fresh_seed())
    n, d, k = 32, 3, 5
    levels = sorted((0.05 + 5 * torch.rand(k - 1, generator=g, dtype=torch.float64)).tolist(), reverse=True)
    levels = [8.0, *levels]
    mu, v = torch.randn(d, generator=g, dtype=torch.float64), 0.3

    def denoise(z, sigma, labels):
        return mu + v / (v + sigma**2) * (z - mu)

    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    noises = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in levels[1:]]
    states = few_step_states(denoise, z, None, levels, noises, kind)
    z_t = 8.0 * z
    assert len(states) == k and torch.equal(states[0], z_t)
    for i, (t, s) in enumerate(zip(levels, levels[1:], strict=False)):
        x = mu + v / (v + t * t) * (z_t - mu)
        r = (s / t) ** 2
        z_t = x + r * (z_t - x) + s * (1 - r) ** 0.5 * noises[i] if kind == "ancestral" else x + s * noises[i]
        assert torch.allclose(states[i + 1], z_t, rtol=1e-12, atol=1e-12)


def test_few_step_recipe_fields_and_errors():
    def recipe(**method):
        method = {"name": "moment-matching", "noise_levels": LEVELS, **method}
        data = tiny_mixture_recipe(**{"method": method, "fake_score.noise_levels": LEVELS})
        return parse_recipe(data, "test")

    r = recipe(steps=4)
    assert r.method.student_levels(2.5) == diffusion.few_step_levels(4, 2.5, 0.05)
    assert recipe(steps=2, levels=[2.5, 0.3]).method.student_levels(2.5) == [2.5, 0.3]
    errors = [
        ({"steps": 9}, r"method\.steps"),
        ({"steps": 2, "levels": [2.5, 1.0, 0.3]}, r"method\.levels: 3 levels \(2\.5, 1, 0\.3\) for method\.steps 2"),
        ({"steps": 2, "levels": [2.0, 0.3]}, r"method\.levels \(2, 0\.3\) must start at sigma\* \(2\.5\)"),
        ({"steps": 2, "levels": [2.5, 0.01]}, r"method\.noise_levels \[0\.05, 2\.5\] must reach into every step"),
        ({"steps": 1, "z_t": "data"}, r"method\.z_t: a one-step student's input is sigma\* z"),
        ({"steps": 2, "z_t": "data", "data": {"path": "x.npz"}}, r"method\.data: a mixture teacher's data is"),
        ({"steps": 2, "data": {"path": "x.npz"}}, r"method\.data: used only with method\.z_t: data"),
    ]
    for method, pattern in errors:
        with pytest.raises(UserError, match=pattern):
            recipe(**method)


def test_each_s_trains_the_step_above_it_whose_input_comes_from_the_students_own_sampler():
    """t is the smallest student level >= s, every step is trained, and z_t is the state of the
    ancestral sampler (written out here) that the exported generator samples with."""
    m = build_k(4, seed=fresh_seed() % 1000)
    draws = IterationDraws(m.recipe.seed, 5, m.device)
    rows = m.batching.micro_rows()[0]
    s, labels, z, _ = m.draw_inputs(draws, "gen", m.recipe.method.noise_levels, rows)
    t, z_t, _ = m._step_inputs(draws, "gen", s, z, labels, rows)
    levels = m.generator.levels
    want_t = torch.tensor([min(v for v in levels if v >= float(si)) for si in s], dtype=t.dtype)
    assert torch.equal(t, want_t)
    grid = torch.tensor(levels, dtype=t.dtype)
    assert {int((grid == v).nonzero()) for v in t} == {0, 1, 2, 3}
    with torch.no_grad():
        state, expected = 2.5 * z, torch.zeros_like(z)
        for q, level in enumerate(levels):
            expected[t == level] = state[t == level]
            if q + 1 < len(levels):
                x = m.generator(state, labels, sigma=level)
                r = (levels[q + 1] / level) ** 2
                n = draws.normal(f"gen/chain{q + 1}", m.global_shape(), rows)
                state = x + r * (state - x) + levels[q + 1] * (1 - r) ** 0.5 * n
    assert torch.allclose(z_t, expected, rtol=1e-6, atol=1e-6)


def test_few_step_generator_gradient_is_the_papers_loss_gradient_on_forward_diffused_data():
    """z_t = x + t n for data x (the mixture's samples) below the top level, sigma* z at it; the
    gradient is that of w(s) x~^T sg(g_phi(z_s) - D_teacher(z_s)) with x~ = g(z_t; t), by autograd."""
    m = build_k(3, "data", **{"method.weighting": "uniform"})
    with torch.no_grad():
        for p in m.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = generator_grad(m, iteration=2)
    draws = IterationDraws(m.recipe.seed, 2, m.device)
    rows = m.batching.micro_rows()[0]
    ((x_data, _),) = m.real_batches(draws, 2)
    s, labels, z, noise = m.draw_inputs(draws, "gen", m.recipe.method.noise_levels, rows)
    levels = m.generator.levels
    t = torch.tensor([min(v for v in levels if v >= float(si)) for si in s])[:, None]
    data_noise = draws.normal("gen/data-noise", m.global_shape(), rows)
    z_t = torch.where(t == levels[0], levels[0] * z, x_data + t * data_noise)
    m.opt_gen.zero_grad(set_to_none=True)
    x = m.generator(z_t, labels, sigma=t[:, 0])
    r = (s[:, None] / t) ** 2
    z_s = x.detach() + r * (z_t - x.detach()) + s[:, None] * (1 - r).sqrt() * noise
    with torch.no_grad():
        mismatch = m.fake(z_s, s, labels) - m.teacher(z_s, s, labels)
    (x * mismatch / s[:, None].square()).sum().div(len(z)).backward()
    want = torch.cat([p.grad.flatten() for p in m.generator.parameters()])
    assert want.norm() > 0 and (t != levels[0]).any() and (t == levels[0]).any()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_few_step_generator_round_trips_and_samples_with_its_trained_levels(tmp_path):
    m = build_k(3)
    gen = m.generator_ema
    gen.save_pretrained(tmp_path / "g")
    loaded, cfg = load_generator(tmp_path / "g")
    assert cfg["levels"] == gen.levels and cfg["sampler"] == "ancestral" and loaded.steps == 3
    g = torch.Generator().manual_seed(fresh_seed())
    z, n1, n2 = (torch.randn(16, 2, generator=g) for _ in range(3))
    (a, b, c) = loaded.levels
    with torch.no_grad():
        got = loaded.sample(z, noises=[n1, n2])
        x = loaded(a * z, sigma=a)
        z_b = x + (b / a) ** 2 * (a * z - x) + b * (1 - (b / a) ** 2) ** 0.5 * n1
        x = loaded(z_b, sigma=b)
        z_c = x + (c / b) ** 2 * (z_b - x) + c * (1 - (c / b) ** 2) ** 0.5 * n2
        want = loaded(z_c, sigma=c)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(loaded.sample(z, steps=1), loaded(z))
    # a model directory written before few-step students is a one-step generator
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    del cfg["levels"], cfg["sampler"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    old, _ = load_generator(tmp_path / "g")
    assert old.levels == [2.5] and old.sampler == "renoise"


@pytest.mark.parametrize("z_t", ["student", "data"])
@pytest.mark.slow
def test_few_step_images_resume_bit_for_bit(image_setup, tmp_path, z_t):
    """A class-conditional image teacher, 3 steps, z_t from the student or from labelled data."""

    def recipe(duration):
        method = {"name": "moment-matching", "steps": 3, "z_t": z_t,
                  "noise_levels": {"dist": "lognormal", "sigma_min": 0.002, "sigma_max": 80}}  # fmt: skip
        if z_t == "data":
            method["data"] = {"path": str(image_setup / "data.npz"), "labels": True, "xflip": True}
        return parse_recipe(
            {
                "kind": "distill",
                "name": "mm",
                "device": "cpu",
                "teacher": {"kind": "pretrained", "path": str(image_setup / "teacher")},
                "generator": {"sigma_init": 80},
                "method": method,
                "fake_score": {"noise_levels": {"sigma_max": 80}},
                "optim": {"lr_gen": 1e-3, "lr_fake": 1e-3},
                "batch": {"size": 8, "micro": 4},
                "duration": duration,
                "logging": {"every": 8, "grid_every": 32, "grid_size": 4, "progress": False},
                "checkpoint": {"every": 16},
            },
            "mm.yaml",
        )

    run_recipe(recipe(32), run_dir=tmp_path / "full")
    run_recipe(recipe(16), run_dir=tmp_path / "split")
    run_recipe(recipe(32), run_dir=tmp_path / "split", resume=True)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "full" / "generator" / "config.json").read_text())
    assert cfg["sampler"] == "ancestral" and len(cfg["levels"]) == 3 and cfg["levels"][0] == 80
    if z_t == "student":  # `emdctl evaluate stats RUN [--no-ema]` reads the EMA or the raw generator
        from typer.testing import CliRunner

        from emdctl.cli import app
        from emdctl.evaluation.stats import images_of, pixel_statistics

        run = tmp_path / "full"
        want = {ema: pixel_statistics(images_of(run, 6, use_ema=ema)) for ema in (True, False)}
        assert want[True] != want[False]
        for ema in (True, False):
            out = tmp_path / f"stats-{ema}.json"
            args = ["evaluate", "stats", str(run), "--n", "6", "--device", "cpu", "--json", str(out)]
            res = CliRunner().invoke(app, args + ([] if ema else ["--no-ema"]))
            assert res.exit_code == 0, res.output
            assert json.loads(out.read_text())[str(run)] == want[ema]


@pytest.mark.slow
def test_distill_sample_export_a_two_step_student_end_to_end(tmp_path):
    """`emdctl distill` a 2-step student on the 8 Gaussians; `emdctl sample` and the evaluation
    during training use its trained 2-step sampler by default; the TorchScript export is the same
    sampler with the step noise taken from z (z_size = 2 x 2)."""
    import numpy as np
    import yaml
    from typer.testing import CliRunner

    from emdctl.cli import app

    data = tiny_mixture_recipe(
        **{
            "method": {"name": "moment-matching", "noise_levels": LEVELS, "steps": 2},
            "fake_score.noise_levels": LEVELS,
            "teacher.network": {"hidden": 64, "layers": 3, "emb_dim": 32},
            "teacher.fit": {"steps": 300, "batch": 512},
            "batch.size": 256,
            "duration": "40k",
            "ema.halflife": "4k",
            "logging": {"every": 20480, "grid_every": "40k", "grid_size": 16, "progress": False,
                        "eval_every": "40k", "eval_samples": 4000},
            "checkpoint": {"every": "20k", "keep": 1},
        }
    )  # fmt: skip
    p = tmp_path / "mm2.yaml"
    p.write_text(yaml.safe_dump(data))
    cli = CliRunner()
    res = cli.invoke(app, ["distill", str(p), "--runs-root", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/tv_distance" in r]
    first, last = evals[0], evals[-1]
    assert first["images"] == 0 and last["images"] >= 40_000
    # off-mode 0.69 -> 0.41 and sliced W2 0.34 -> 0.18 here (two ancestral teacher steps start nearer
    # the modes than one step's 1.0)
    assert last["eval/off_mode_fraction"] < 0.7 * first["eval/off_mode_fraction"]
    assert last["eval/sliced_wasserstein"] < 0.6 * first["eval/sliced_wasserstein"]
    for args, out in ((["--n", "40"], "a"), (["--n", "40", "--steps", "2"], "b"), (["--n", "40", "--steps", "1"], "c")):
        res = cli.invoke(app, ["sample", str(run), "--out", str(tmp_path / out), "--device", "cpu", *args])
        assert res.exit_code == 0, res.output
    a, b, c = (np.load(tmp_path / o / "samples.npz")["arr_0"] for o in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    res = cli.invoke(app, ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ts" / "config.json").read_text())
    assert cfg["z_size"] == 4 and cfg["steps"] == 2 and cfg["sampler"] == "ancestral"
    scripted = torch.jit.load(str(tmp_path / "ts" / "generator.pth"))
    gen, _ = load_generator(run / "generator")
    z = torch.randn(50, 4)
    with torch.no_grad():
        assert torch.allclose(scripted(z), gen.sample(z[:, :2], noises=[z[:, 2:]]), atol=1e-6)


@pytest.mark.slow
def test_curves_draw_what_the_method_logs(tmp_path, monkeypatch):
    """Each method declares its metrics' prefixes; the trainer knows none of them by name, and
    Moment Matching's own metric reaches curves.png."""
    import emdctl.trainer as trainer

    drawn = {}
    monkeypatch.setattr(trainer, "save_curves", lambda records, keys, path: drawn.setdefault("keys", keys))
    levels = {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 2.5}
    r = parse_recipe(tiny_mixture_recipe(method={"name": "moment-matching", "noise_levels": levels}), "t")
    run_recipe(r, run_dir=tmp_path / "run")
    assert "mm/moment_gap_rms" in drawn["keys"] and "loss/gen" in drawn["keys"]
    assert MomentMatching.plotted[-1] == "mm/" and "langevin/" not in MomentMatching.plotted
