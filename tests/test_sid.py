"""SiD and SiDA against float64 references written out from their papers' losses, with exact
analytic teacher and fake scores; their special cases; resume and SiD²A (generator.init_from)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from emdctl.checkpoint import CheckpointManager
from emdctl.commands.distill import run_recipe
from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.methods import DMD2, SiD, SiDA
from emdctl.recipe import parse_recipe
from emdctl.rng import IterationDraws
from emdctl.teachers import load_teacher
from emdctl.teachers.mixture import GaussianMixture, MixtureDenoiser

from .conftest import fresh, tiny_mixture_recipe

CLASSES = {"sid": SiD, "sida": SiDA, "dmd2": DMD2}


def build(name: str, seed=0, **overrides):
    recipe = parse_recipe(tiny_mixture_recipe(**{"method": {"name": name}, "seed": seed, **overrides}), "test")
    m = CLASSES[name](recipe, load_teacher(recipe.teacher, seed=0), DistContext())
    m.initialize()
    return m


def random_seed(g) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def exact_denoisers(m, g):
    """The teacher mixture's exact denoiser, and that of a second mixture (its means moved at
    random) standing in for an exact fake score."""
    mix = m.teacher_info.mixture
    moved = mix.means + 0.3 * torch.randn(mix.means.shape, generator=g, dtype=torch.float64)
    other = GaussianMixture(mix.weights, moved, mix.scales * 1.2)
    return MixtureDenoiser(mix), MixtureDenoiser(other)


def flat_grad(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in module.parameters()])


def method_grad(m, iteration) -> torch.Tensor:
    m.opt_gen.zero_grad(set_to_none=True)
    m.generator_gradients(IterationDraws(m.recipe.seed, iteration, m.device))
    return flat_grad(m.generator)


def reference_grad(m, iteration, per_sample_loss) -> torch.Tensor:
    """d/dtheta of mean over the batch of per_sample_loss(x, sigma, labels, eps, rows), with a float64
    copy of the generator and the same draws."""
    gen = copy.deepcopy(m.generator).double()
    draws = IterationDraws(m.recipe.seed, iteration, m.device)
    total = 0
    for rows in m.batching.micro_rows():
        sigma, labels, z, eps = m.generator_inputs(draws, rows)
        x = gen(z.double(), labels)
        total = total + per_sample_loss(x, sigma.double(), labels, eps.double(), rows).sum()
    grads = torch.autograd.grad(total / m.batching.global_size, list(gen.parameters()), allow_unused=True)
    return torch.cat(
        [
            (gr if gr is not None else torch.zeros_like(p)).flatten()
            for gr, p in zip(grads, gen.parameters(), strict=True)
        ]
    )


def sid_written_out(d_t, d_f, x, alpha):
    """The official code's SiD loss, per sample, with its normalizer held constant."""
    norm = (x - d_t).abs().mean(1).detach()
    return ((d_t - d_f) * ((d_t - x) - alpha * (d_t - d_f))).sum(1) / norm


def assert_close(got, want):
    assert want.norm() > 0
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=2e-4 * float(want.abs().max())), (
        float((got.double() - want).abs().max()),
        float(want.abs().max()),
    )


def test_sid_gradient_is_the_papers_loss_float64():
    """Exact teacher and fake scores: the generator's gradient is that of SiD's loss, with the paths
    through both networks' inputs, at random alpha, seed and iteration."""
    g = fresh()
    for alpha in (1.2, float(torch.empty(()).uniform_(-1, 2, generator=g))):
        m = build("sid", seed=random_seed(g), **{"method.alpha": alpha, "batch.micro": 16})
        teacher, fake = exact_denoisers(m, g)
        m.inference.teacher, m.inference.fake = teacher, fake
        it = int(torch.randint(0, 1000, (1,), generator=g))

        def loss(x, sigma, labels, eps, rows, teacher=teacher, fake=fake, alpha=alpha):
            x_t = x + sigma[:, None] * eps
            return sid_written_out(teacher(x_t, sigma), fake(x_t, sigma), x, alpha)

        assert_close(method_grad(m, it), reference_grad(m, it, loss))


def test_sid_without_the_network_paths_is_the_normalized_diff_instruct_direction():
    """Stop the gradient at the networks' inputs: dL/dx = -(D_t - D_f) / mean|x - D_t| for every
    alpha, which is DMD2's distribution-matching direction (DMD2 with gan: false) at the same draws."""
    g = fresh()
    seed, it = random_seed(g), int(torch.randint(0, 1000, (1,), generator=g))
    dmd = build("dmd2", seed=seed, **{"method.gan": False, "method.noise_levels": {"dist": "karras"}})
    teacher, fake = exact_denoisers(dmd, g)

    def detached(den):
        return lambda x, sigma, labels=None: den(x.detach(), sigma, labels)

    dmd.inference.teacher, dmd.inference.fake = teacher, fake
    want = method_grad(dmd, it)
    for alpha in (0.0, 1.2, -0.7):
        sid = build("sid", seed=seed, **{"method.alpha": alpha, "method.noise_levels": {"dist": "karras"}})
        sid.inference.teacher, sid.inference.fake = detached(teacher), detached(fake)
        assert torch.allclose(method_grad(sid, it), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # ...and with the paths, alpha matters (the loss is linear in it, so is the gradient)
    grads = []
    for alpha in (0.0, 1.0, 2.0):
        sid = build("sid", seed=seed, **{"method.alpha": alpha})
        sid.inference.teacher, sid.inference.fake = teacher, fake
        grads.append(method_grad(sid, it))
    assert (grads[1] - grads[0]).norm() > 1e-3 * grads[0].norm()
    assert torch.allclose(grads[2] - grads[1], grads[1] - grads[0], rtol=1e-3, atol=1e-4 * float(grads[0].abs().max()))


def test_sid_is_zero_when_the_fake_score_is_the_teacher():
    """D_f = D_t: the loss and its gradient vanish at every alpha (the student's distribution is
    a fixed point)."""
    m = build("sid", **{"method.alpha": 1.2})
    teacher, _ = exact_denoisers(m, fresh())
    m.inference.teacher = m.inference.fake = teacher
    assert method_grad(m, 0).abs().max() == 0


def capture_bottleneck(critic):
    """The input of the MLP's output layer, by a hook of the test's own (not the critic's tap)."""
    seen = {}
    critic.denoiser.model.out.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    return seen


def test_sida_gradient_is_sid_plus_the_papers_adversarial_term_float64():
    g = fresh()
    m = build("sida", seed=random_seed(g), **{"method.gan_gen_weight": 0.5, "batch.micro": 32})
    teacher, _ = exact_denoisers(m, g)
    m.inference.teacher = teacher
    critic64 = copy.deepcopy(m.fake).double()
    seen = capture_bottleneck(critic64)
    it = int(torch.randint(0, 1000, (1,), generator=g))

    def loss(x, sigma, labels, eps, rows):
        x_t = x + sigma[:, None] * eps
        d_t = teacher(x_t, sigma)
        d_f = critic64.denoiser(x_t, sigma)
        logit = seen["h"].mean(1)  # the channel mean of the bottleneck
        norm = (x - d_t).abs().mean(1).detach()
        gan = 0.5 * 2 * F.softplus(-logit.clamp(-10, 10)) / norm  # weight * pixels * BCE(l, 1) / normalizer
        return sid_written_out(d_t, d_f, x, 1.0) + gan

    assert_close(method_grad(m, it), reference_grad(m, it, loss))


def critic_step(name: str, **overrides):
    """(method, draws, rows, its critic loss and stats, the bottleneck seen by the test's own hook)
    of the first micro-batch, at a random seed and iteration."""
    g = fresh()
    m = build(name, seed=random_seed(g), **overrides)
    it = int(torch.randint(0, 1000, (1,), generator=g))
    draws = IterationDraws(m.recipe.seed, it, m.device)
    m.begin_iteration(draws, it)
    rows = m.batching.micro_rows()[0]
    got, stats = m.critic_loss(draws, 0, rows)
    return m, draws, rows, got, stats, capture_bottleneck(m.fake)


def test_sida_critic_loss_is_dsm_plus_the_weighted_discriminator_loss():
    m, draws, rows, got, stats, seen = critic_step("sida", **{"method.gan_disc_weight": 0.7})
    x_real, _ = m.reals[rows.start]
    sigma = m.draw_sigma(draws, "fake0/sigma", m.recipe.fake_score.noise_levels, rows)
    noise = draws.normal("fake0/noise", m.global_shape(), rows)
    x0 = m.generator(draws.normal("fake0/z", m.global_shape(), rows), None)
    lam = m.fake.denoiser.dsm_weight(sigma)
    d_fake = m.fake.denoiser(x0 + sigma[:, None] * noise, sigma)
    l_fake = seen["h"].mean(1)
    m.fake.denoiser(x_real + sigma[:, None] * noise, sigma)
    l_real = seen["h"].mean(1)
    want = lam * (d_fake - x0).square().sum(1) + 0.7 * lam * (F.softplus(-l_real) + F.softplus(l_fake)) / 2
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert float(stats["sida/logit_real"].detach()) == pytest.approx(float(l_real.mean().detach()), rel=1e-4, abs=1e-6)


def test_recipe_rules():
    with pytest.raises(UserError, match=r"method\.data: sida trains its discriminator on real images"):
        parse_recipe({"teacher": {"kind": "pretrained", "path": "x"}, "method": {"name": "sida"}}, "r")
    with pytest.raises(UserError, match=r"method\.data: a mixture teacher's real data is the mixture itself"):
        parse_recipe(tiny_mixture_recipe(**{"method": {"name": "dmd2", "data": {"path": "x.npz"}}}), "r")
    r = parse_recipe(tiny_mixture_recipe(**{"method": {"name": "sid"}}), "r")
    # SiD: generator levels are tmax = 800 on the Karras ramp; the fake score learns at EDM's levels
    assert r.method.noise_levels.dist == "karras" and r.method.noise_levels.sigma_max == pytest.approx(24.408, abs=1e-3)
    assert r.fake_score.noise_levels.dist == "lognormal"
    r = parse_recipe(tiny_mixture_recipe(**{"method": {"name": "dmd2"}}), "r")
    assert r.method.noise_levels.sigma_max == pytest.approx(72.054, abs=1e-3)
    assert r.method.noise_levels.sigma_min == pytest.approx(0.0032316, rel=1e-4)
    assert r.fake_score.noise_levels.dist == "karras" and r.fake_score.noise_levels.sigma_max == 80


@pytest.mark.parametrize("name", ["sid", "sida", "dmd2"])
def test_mixture_resume_bit_for_bit(tmp_path, name):
    extra = {"fake_score.steps_per_iteration": 2} if name == "dmd2" else {}
    full = tiny_mixture_recipe(**{"method": {"name": name}, "duration": 320, "checkpoint.every": 128, **extra})
    run_recipe(parse_recipe(full, "r"), run_dir=tmp_path / "full")
    part = tiny_mixture_recipe(**{"method": {"name": name}, "duration": 128, "checkpoint.every": 128, **extra})
    run_recipe(parse_recipe(part, "r"), run_dir=tmp_path / "split")
    run_recipe(parse_recipe(full, "r"), run_dir=tmp_path / "split", resume=True)
    a, ma = CheckpointManager(tmp_path / "full").load()
    b, mb = CheckpointManager(tmp_path / "split").load()
    assert ma["iteration"] == mb["iteration"] == 5 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "dmd2":
        assert any(k.startswith("net.fake.head.") for k in a)


def test_sida_without_its_gan_terms_is_sid():
    """gan_gen_weight = 0: SiDA's generator gradient is SiD's at the same alpha and draws (its fake
    score network's logits enter nothing)."""
    g = fresh()
    seed, it = random_seed(g), int(torch.randint(0, 1000, (1,), generator=g))
    sida = build("sida", seed=seed, **{"method.gan_gen_weight": 0.0})
    sid = build("sid", seed=seed, **{"method.alpha": 1.0})
    teacher, _ = exact_denoisers(sid, g)
    sid.inference.teacher = sida.inference.teacher = teacher
    sid.fake.load_state_dict(sida.fake.denoiser.state_dict())
    want = method_grad(sid, it)
    assert want.norm() > 0
    assert torch.allclose(method_grad(sida, it), want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))
