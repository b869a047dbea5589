"""DMD2 against a float64 reference written out from its losses (exact teacher and fake scores on
an analytic mixture); its classifier head; SiDA, DMD2 and SiD²A on an image teacher."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from emdctl.checkpoint import CheckpointManager
from emdctl.commands.distill import run_recipe
from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.methods import DiffInstruct, SiDA
from emdctl.networks.critic import ConvLogitHead, FakeScoreCritic
from emdctl.recipe import parse_recipe
from emdctl.rng import IterationDraws
from emdctl.teachers import load_pretrained_denoiser, load_teacher

from .conftest import fresh, tiny_mixture_recipe
from .test_sid import (
    assert_close,
    build,
    capture_bottleneck,
    critic_step,
    exact_denoisers,
    method_grad,
    random_seed,
    reference_grad,
)


def test_dmd2_gradient_is_distribution_matching_plus_the_gan_term_float64():
    """Exact teacher and fake scores for the distribution-matching part; the classifier head on the
    fake network's bottleneck, in float64, for the GAN part, at its own noise level."""
    g = fresh()
    m = build("dmd2", seed=random_seed(g), **{"method.gan_gen_weight": 0.3, "batch.micro": 16})
    teacher, fake = exact_denoisers(m, g)
    m.inference.teacher, m.inference.fake = teacher, fake
    critic64 = copy.deepcopy(m.fake).double()
    seen = capture_bottleneck(critic64)
    it = int(torch.randint(0, 1000, (1,), generator=g))
    draws = IterationDraws(m.recipe.seed, it, m.device)

    def loss(x, sigma, labels, eps, rows):
        x_t = x.detach() + sigma[:, None] * eps
        d_t, d_f = teacher(x_t, sigma), fake(x_t, sigma)
        grad_dm = (d_f - d_t) / (x.detach() - d_t).abs().mean(1, keepdim=True)  # DMD2's `grad`
        s_gan = m.draw_sigma(draws, "gen/gan_sigma", m.recipe.method.gan_levels, rows).double()
        n_gan = draws.normal("gen/gan_noise", m.global_shape(), rows).double()
        critic64.denoiser(x + s_gan[:, None] * n_gan, s_gan)
        logit = critic64.head(seen["h"])
        # 0.5 ||x - sg(x - grad)||^2 (per sample: emdctl sums over pixels) + weight * pixels * softplus(-l)
        return 0.5 * (x - (x - grad_dm).detach()).square().sum(1) + 0.3 * 2 * F.softplus(-logit).mean(1)

    assert_close(method_grad(m, it), reference_grad(m, it, loss))


def test_dmd2_critic_loss_is_dsm_plus_the_weighted_classification_loss():
    m, draws, rows, got, _, seen = critic_step("dmd2", **{"method.gan_disc_weight": 0.2})
    shape = m.global_shape()
    sigma = m.draw_sigma(draws, "fake0/sigma", m.recipe.fake_score.noise_levels, rows)
    x0 = m.generator(draws.normal("fake0/z", shape, rows), None)
    d = m.fake.denoiser(x0 + sigma[:, None] * draws.normal("fake0/noise", shape, rows), sigma)
    levels = m.recipe.method.gan_levels

    def logit(x, who):
        s = m.draw_sigma(draws, f"fake0/gan_sigma_{who}", levels, rows)
        m.fake.denoiser(x + s[:, None] * draws.normal(f"fake0/gan_noise_{who}", shape, rows), s)
        return m.fake.head(seen["h"]).mean(1)

    x_real, _ = m.reals[rows.start]
    cls = F.softplus(logit(x0, "fake")) + F.softplus(-logit(x_real, "real"))
    want = m.fake.dsm_weight(sigma) * (d - x0).square().sum(1) + 0.2 * 2 * cls
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial", [8, 4, 3, 1])
def test_conv_head_is_dmd2s_branch_and_reduces_any_bottleneck_to_one_logit(spatial):
    head = ConvLogitHead(64, spatial)
    assert head(torch.randn(5, 64, spatial, spatial)).shape == (5, 1)
    if spatial == 8:  # DMD2's ImageNet-64 branch: 4x4 stride 2 (8 -> 4), 4x4 over the rest (4 -> 1), 1x1
        assert (head.down.kernel_size, head.down.stride, head.pool.kernel_size) == ((4, 4), (2, 2), (4, 4))


def image_recipe(root, name, **kw):
    method = {"name": name, "data": {"path": str(root / "data.npz"), "labels": True}}
    r = {
        "kind": "distill",
        "name": "i",
        "device": "cpu",
        "teacher": {"kind": "pretrained", "path": str(root / "teacher")},
        "method": method,
        "optim": {"lr_gen": 1e-3, "lr_fake": 1e-3},
        "batch": {"size": 8, "micro": 4},
        "duration": 32,
        "logging": {"every": 8, "grid_every": 32, "grid_size": 4, "progress": False},
        "checkpoint": {"every": 16},
    }
    for k, v in kw.items():
        node = r
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return parse_recipe(r, "r")


def test_the_critic_taps_the_songunet_encoder(image_setup):
    den = load_pretrained_denoiser(image_setup / "teacher")
    critic = FakeScoreCritic(copy.deepcopy(den), "channel-mean")
    x, sigma = torch.randn(3, 3, 16, 16), torch.full((3,), 0.7)
    labels = torch.eye(3)
    d, logits = critic(x, sigma, labels, features=True)
    assert torch.equal(d, den(x, sigma, labels))  # the tap changes nothing of D
    seen = {}
    last = list(den.model.enc.values())[-1]
    last.register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", out))
    den(x, sigma, labels)
    assert logits.shape == (3, seen["h"].shape[-1] * seen["h"].shape[-2])
    assert torch.allclose(logits, seen["h"].mean(1).flatten(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sida", "dmd2"])
def test_images_resume_bit_for_bit(image_setup, tmp_path, name):
    extra = {"fake_score.steps_per_iteration": 2} if name == "dmd2" else {}
    run_recipe(image_recipe(image_setup, name, **extra), run_dir=tmp_path / "full")
    run_recipe(image_recipe(image_setup, name, duration=16, **extra), run_dir=tmp_path / "split")
    run_recipe(image_recipe(image_setup, name, **extra), run_dir=tmp_path / "split", resume=True)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "full" / "generator" / "config.json").read_text())
    assert cfg["method"] == name


def build_sida(recipe):
    m = SiDA(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
    m.initialize()
    return m


@pytest.mark.slow
def test_sid2a_starts_from_a_sid_run(image_setup, tmp_path):
    """SiD²A: SiDA whose generator (and its EMA) starts from a SiD run's EMA generator."""
    run_recipe(image_recipe(image_setup, "sid", method={"name": "sid"}), run_dir=tmp_path / "sid")
    m = build_sida(image_recipe(image_setup, "sida", **{"generator.init_from": str(tmp_path / "sid")}))
    sid_state, _ = CheckpointManager(tmp_path / "sid").load()
    for k, v in m.generator.state_dict().items():
        assert torch.equal(v, sid_state[f"net.generator_ema.{k}"]), k
        assert torch.equal(m.generator_ema.state_dict()[k], v), k
    teacher = load_pretrained_denoiser(image_setup / "teacher").state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in m.generator.denoiser.state_dict().items())
    assert all(torch.equal(v, teacher[k]) for k, v in m.fake.denoiser.state_dict().items())  # the fake: the teacher
    other = {"generator.init_from": str(tmp_path / "sid"), "generator.sigma_init": 80}
    with pytest.raises(UserError, match=r"generator\.init_from .*sigma\* = 2\.5.*set generator\.sigma_init to 2\.5"):
        build_sida(image_recipe(image_setup, "sida", **other))
    with pytest.raises(UserError, match=r"generator\.init_from \(.*missing\)"):
        build_sida(image_recipe(image_setup, "sida", **{"generator.init_from": str(tmp_path / "missing")}))


def test_dmd2_without_its_gan_is_diff_instruct_with_dmds_weighting():
    """gan: false: DMD2's gradient is Diff-Instruct's with `weighting: dmd` (w = sigma^2 / mean|x - D_t|
    times the direction (D_t - D_f) / sigma^2) at the same levels and draws."""
    g = fresh()
    seed, it = random_seed(g), int(torch.randint(0, 1000, (1,), generator=g))
    levels = {"dist": "karras", "sigma_min": 0.01, "sigma_max": 40.0}
    dmd = build("dmd2", seed=seed, **{"method.gan": False, "method.noise_levels": levels})
    recipe = parse_recipe(
        tiny_mixture_recipe(
            **{"method": {"name": "diff-instruct", "weighting": "dmd", "noise_levels": levels}, "seed": seed}
        ),
        "t",
    )
    di = DiffInstruct(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
    di.initialize()
    teacher, fake = exact_denoisers(dmd, g)
    for m in (dmd, di):
        m.inference.teacher, m.inference.fake = teacher, fake
    want = method_grad(di, it)
    assert want.norm() > 0
    # float32: sigma^2 * (Delta / sigma^2) rounds; a wrong weighting would be off by O(1)
    assert torch.allclose(method_grad(dmd, it), want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))
