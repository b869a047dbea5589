"""EMD's core against exact references (analytic teachers; docs/algorithm.md's special cases)."""

from __future__ import annotations

import math

import pytest
import torch

from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.langevin import e_step
from emdctl.methods import EMD, DiffInstruct
from emdctl.recipe import parse_recipe
from emdctl.rng import IterationDraws
from emdctl.teachers import load_teacher

from .conftest import REPO, fresh, tiny_mixture_recipe


def build(method: str, seed=0, **overrides):
    data = tiny_mixture_recipe(**{"method.name": method, "seed": seed, **overrides})
    if method != "emd":
        data["method"].pop("langevin", None)
    recipe = parse_recipe(data, "test")
    teacher = load_teacher(recipe.teacher, seed=0)
    cls = {"emd": EMD, "diff-instruct": DiffInstruct}[method]
    m = cls(recipe, teacher, DistContext())
    m.initialize()
    return m


def flat_grad(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in module.parameters()])


def generator_grad(m, iteration=0) -> torch.Tensor:
    m.opt_gen.zero_grad(set_to_none=True)
    m.generator_gradients(IterationDraws(m.recipe.seed, iteration, m.device))
    return flat_grad(m.generator)


def test_K0_gives_zero_gradient():
    m = build("emd", **{"method.langevin.steps": 0})
    assert generator_grad(m).abs().max() == 0


@pytest.mark.parametrize("weighting", ["sigma2", "uniform"])
def test_K1_with_noise_cancellation_is_gamma_times_diff_instruct(weighting):
    """K = 1, gamma_z = 0, noise cancellation (prior pull dropped from the ledger): exactly
    gamma_eps times the Diff-Instruct gradient, at a fixed seed."""
    gamma = 0.3
    emd = build(
        "emd",
        **{
            "method.langevin": {
                "steps": 1,
                "gamma_eps": gamma,
                "gamma_z": 0.0,
                "cancel_noise": True,
                "prior_pull": False,
            },
            "method.weighting": weighting,
        },
    )
    di = build("diff-instruct", **{"method.weighting": weighting})
    g_emd, g_di = generator_grad(emd), generator_grad(di)
    assert g_di.norm() > 0
    # float32 end to end: agreement to 1e-4 of the gradient scale (a wrong factor would be off by O(1))
    assert torch.allclose(g_emd, gamma * g_di, rtol=1e-3, atol=1e-4 * float(g_di.abs().max()))


def test_K1_with_prior_pull_matches_diff_instruct_in_expectation():
    """Keeping -gamma * eps^0 in the ledger adds a zero-mean term: equal on average over draws."""
    gamma = 0.3
    emd = build("emd", **{"method.langevin": {"steps": 1, "gamma_eps": gamma, "prior_pull": True}, "batch.size": 256})
    di = build("diff-instruct", **{"batch.size": 256})
    ge = torch.stack([generator_grad(emd, i) for i in range(40)])
    gd = torch.stack([generator_grad(di, i) for i in range(40)]) * gamma
    diff = (ge - gd).mean(0)
    se = (ge - gd).std(0) / math.sqrt(len(ge))
    # every coordinate within 4.5 standard errors; and the per-draw difference is real (not zero)
    assert (diff.abs() <= 4.5 * se + 1e-9).float().mean() > 0.99
    assert (ge - gd).abs().max() > 0


def test_noise_cancellation_reduces_gradient_variance():
    """Measured over independent draws: the cancelled ledger vs the raw eps^K."""

    def variance(cancel):
        m = build(
            "emd", **{"method.langevin": {"steps": 4, "gamma_eps": 0.1, "cancel_noise": cancel, "prior_pull": False}}
        )
        g = torch.stack([generator_grad(m, i) for i in range(24)])
        return float(g.var(0).sum())

    v_on, v_off = variance(True), variance(False)
    assert v_on < 0.1 * v_off, (v_on, v_off)


def test_ledger_equals_eps_minus_start_minus_injected_noise_float64():
    g = torch.Generator().manual_seed(123)
    n, d, K, gamma = 64, 3, 6, 0.2
    z0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    gen = lambda z, y: z @ A.T  # noqa: E731
    teacher = lambda x, s, y: 0.3 * x  # noqa: E731
    fake = lambda x, s, y: torch.tanh(x)  # noqa: E731
    xi = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(K)]
    res = e_step(gen, teacher, fake, z0, eps0, sigma, None, xi, None, K, gamma, cancel_noise=True, prior_pull=True)
    injected = sum(math.sqrt(2 * gamma) * x for x in xi)
    assert torch.allclose(res.eps_m, res.eps - eps0 - injected, atol=1e-12)
    raw = e_step(gen, teacher, fake, z0, eps0, sigma, None, xi, None, K, gamma, cancel_noise=False)
    assert torch.equal(raw.eps_m, res.eps)


def test_z_step_is_a_vector_jacobian_product():
    g = torch.Generator().manual_seed(7)
    n, d, gamma_z = 16, 4, 0.05
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    gen = lambda z, y: torch.sin(z) @ A.T  # noqa: E731
    teacher = lambda x, s, y: x * 0.5  # noqa: E731
    fake = lambda x, s, y: x * 0.1  # noqa: E731
    z0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = torch.full((n,), 0.7, dtype=torch.float64)
    zeros = [torch.zeros(n, d, dtype=torch.float64)]
    res = e_step(gen, teacher, fake, z0, eps0, sigma, None, zeros, zeros, 1, 0.0, gamma_z=gamma_z)
    x = gen(z0, None) + 0.7 * eps0
    delta = (0.5 * x - 0.1 * x) / 0.49
    jtd = (delta @ A) * torch.cos(z0)  # J^T delta for g(z) = A sin(z)
    assert torch.allclose(res.z, z0 + gamma_z * (jtd - z0), atol=1e-12)


@pytest.mark.parametrize("gamma_z", [0.0, 0.02])
def test_chain_samples_its_exact_target(gamma_z):
    """Linear-Gaussian case: teacher N(0, s_p^2), student g(z) = a z. Under the joint target
    pi(eps, z), x = a z + sigma eps is distributed as the teacher's p_sigma = N(0, s_p^2 + sigma^2)
    exactly. With z frozen (gamma_z = 0) the chain samples pi(eps | z), which is Gaussian with
    precision P = 1 + sigma^2 c and mean -a z sigma c / P, c = 1/(s_p^2+sigma^2) - 1/(a^2+sigma^2)."""
    g = torch.Generator().manual_seed(0)
    n, s_p, a, sigma_v, gamma = 20000, 1.5, 0.6, 0.8, 0.02
    sigma = torch.full((n,), sigma_v, dtype=torch.float64)
    teacher = lambda x, s, y: x * s_p**2 / (s_p**2 + sigma_v**2)  # noqa: E731 - exact Gaussian denoisers
    fake = lambda x, s, y: x * a**2 / (a**2 + sigma_v**2)  # noqa: E731
    gen = lambda z, y: a * z  # noqa: E731
    K = 400
    xi = [torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(K)]
    xz = [torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(K)]
    z0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    res = e_step(gen, teacher, fake, z0, eps0, sigma, None, xi, xz, K, gamma, gamma_z=gamma_z, cancel_noise=False)
    x = a * res.z + sigma_v * res.eps
    if gamma_z > 0:
        expected = s_p**2 + sigma_v**2
    else:
        c = 1 / (s_p**2 + sigma_v**2) - 1 / (a**2 + sigma_v**2)
        P = 1 + sigma_v**2 * c
        expected = a**2 * (1 - sigma_v**2 * c / P) ** 2 + sigma_v**2 / P
    assert abs(float(x.var()) - expected) < 0.05 * expected, (float(x.var()), expected)
    start = a * z0 + sigma_v * eps0
    assert abs(float(start.var()) - (a**2 + sigma_v**2)) < 0.05  # the chain started at the student


def test_z_chain_is_stable_at_small_sigma_with_scaling():
    """A constant z-step diverges as sigma -> 0 (curvature ~ |J|^2 / sigma^2 once the fake score
    differs from the teacher); the sigma^2 scaling does not. Same chain, same fake score, both ways."""

    def grad(scaling):
        m = build(
            "emd",
            **{
                "method.langevin": {"steps": 8, "gamma_eps": 0.1, "gamma_z": 0.2, "z_step_scaling": scaling},
                "method.noise_levels": {"dist": "loguniform", "sigma_min": 0.02, "sigma_max": 0.05},
            },
        )
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a fake score that has moved away from the teacher, as in training
            for p in m.fake.parameters():
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
        return generator_grad(m)

    scaled, unscaled = grad("sigma2"), grad("none")
    assert torch.isfinite(scaled).all() and scaled.norm() < 10
    assert not torch.isfinite(unscaled).all() or unscaled.norm() > 1e3 * scaled.norm()


def test_compiled_e_step_matches_eager():
    """The E-step compiles as a whole (torch.compile; here inductor on the CPU) and gives the eager
    result, with and without the z-chain's vector-Jacobian products."""
    from emdctl.networks import build_denoiser

    cfg = {"precond": "edm", "precond_kwargs": {"sigma_data": 0.5}, "img_shape": [2], "label_dim": 0,
           "arch": "mlp", "arch_kwargs": {"hidden": 16, "layers": 1, "emb_dim": 8}}  # fmt: skip
    torch.manual_seed(0)
    gen, teacher, fake = (build_denoiser(cfg) for _ in range(3))
    for m in (gen, teacher, fake):
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)

    def g(z, y):
        return gen(z * 2.5, 2.5, y)

    n, K = 32, 3
    g_ = torch.Generator().manual_seed(1)
    z0, eps0, sigma = (
        torch.randn(n, 2, generator=g_),
        torch.randn(n, 2, generator=g_),
        torch.rand(n, generator=g_) + 0.1,
    )
    xi = [torch.randn(n, 2, generator=g_) for _ in range(K)]
    xz = [torch.randn(n, 2, generator=g_) for _ in range(K)]
    compiled = torch.compile(e_step, dynamic=False)
    for gz in (0.0, 0.05):
        args = (g, teacher, fake, z0, eps0, sigma, None, xi, xz if gz else None, K, 0.1, gz)
        ref, out = e_step(*args, prior_pull=False), compiled(*args, prior_pull=False)
        assert torch.allclose(out.eps_m, ref.eps_m, atol=1e-6) and torch.allclose(out.z, ref.z, atol=1e-6)


@pytest.mark.parametrize("method", ["emd", "diff-instruct"])
def test_pinned_level_removes_exactly_the_level_push(image_setup, method):
    """method.pin_level: the generator's loss gives no gradient to a shift of each image's
    per-channel level, and the same gradient as without pinning to any level-free change.
    Probed with two parameters added to the generator's output: a per-channel level, and the
    coefficient of a fresh random zero-mean pattern."""
    rng = fresh()
    pattern = torch.randn(3, 16, 16, generator=rng)
    pattern = pattern - pattern.mean((-2, -1), keepdim=True)
    grads, fake_shift = {}, None
    for pin in (False, True):
        data = {
            "kind": "distill", "name": "pin", "seed": 3, "device": "cpu",
            "teacher": {"kind": "pretrained", "path": str(image_setup / "teacher")},
            "method": {"name": method, "pin_level": pin, **({"langevin": {"steps": 2}} if method == "emd" else {})},
            "batch": {"size": 8}, "duration": 8,
        }  # fmt: skip
        recipe = parse_recipe(data, "pin.yaml")
        cls = {"emd": EMD, "diff-instruct": DiffInstruct}[method]
        m = cls(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
        m.initialize()
        if fake_shift is None:
            fake_shift = [0.02 * torch.randn(p.shape, generator=rng) for p in m.fake.parameters()]
        with torch.no_grad():  # a fake score apart from the teacher, as after some training
            for p, dp in zip(m.fake.parameters(), fake_shift, strict=True):
                p += dp
        level = torch.zeros(3, 1, 1, requires_grad=True)
        coef = torch.zeros((), requires_grad=True)

        def probe(mod, args, out, level=level, coef=coef):
            return out + level + coef * pattern

        m.generator.register_forward_hook(probe)
        m.generator_gradients(IterationDraws(m.recipe.seed, 0, m.device))
        grads[pin] = (level.grad.clone(), coef.grad.clone())
    (level_free, coef_free), (level_pinned, coef_pinned) = grads[False], grads[True]
    assert level_free.abs().max() > 1e-3
    assert level_pinned.abs().max() < 1e-5 * level_free.abs().max()
    assert torch.allclose(coef_pinned, coef_free, rtol=1e-4, atol=1e-6) and coef_free.abs() > 0


def test_pinned_level_is_refused_for_a_mixture():
    with pytest.raises(UserError, match="method.pin_level: pins"):
        parse_recipe(tiny_mixture_recipe(**{"method.pin_level": True}), "test")


@pytest.mark.slow
def test_pinned_level_stops_the_mnist_students_drift(shared_data):
    """On the MNIST DDPM (level-blind, its denoiser biased to dark: tests/test_teachers.py) a
    Diff-Instruct student at lr_gen 1e-4 drifts darker every iteration; with method.pin_level its
    level stays put. Fresh training seed; the level is the mean output on 32 fresh latents, against
    the initial generator. Measured over 41 seeds (20 iterations of 64): unpinned -0.34 to -1.73
    (mean -1.3), pinned +0.02 to +0.16 (mean +0.06, a small upward drift that varies with the seed;
    the one CI failure of the 0.15 bound drew 0.16). The bounds sit outside both ranges with margin:
    a pin that did nothing gives the unpinned value bit for bit (same seed) and fails the ratio."""
    from emdctl.recipe import read_yaml

    base = read_yaml(REPO / "recipes" / "mnist.yaml")
    base["teacher"]["path"] = str(shared_data / "teachers" / "ddpm_mnist_pulfer_myunet.pt")
    seed = int(torch.randint(0, 2**31, (1,), generator=fresh()))
    z = torch.randn(32, 1, 28, 28, generator=fresh())
    drift = {}
    for pin in (False, True):
        method = {"name": "diff-instruct", "noise_levels": base["method"]["noise_levels"], "pin_level": pin}
        optim = {**base["optim"], "lr_gen": 1e-4}
        recipe = parse_recipe({**base, "device": "cpu", "seed": seed, "method": method, "optim": optim}, "mnist.yaml")
        m = DiffInstruct(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
        m.initialize()
        start = float(m.generator(z, None).detach().mean())
        for it in range(20):
            m.train_step(it)
        drift[pin] = float(m.generator(z, None).detach().mean()) - start
    assert drift[False] < -0.2, drift
    assert abs(drift[True]) < min(0.3, 0.75 * abs(drift[False])), drift


def test_runs_advise_when_pin_level_does_not_suit_the_teacher(shared_data, image_setup):
    from rich.console import Console

    from emdctl.commands.distill import _advise_on_level

    mnist = {"kind": "ddpm-pulfer", "path": str(shared_data / "teachers" / "ddpm_mnist_pulfer_myunet.pt")}
    edm = {"kind": "pretrained", "path": str(image_setup / "teacher")}
    for spec, pin, expected in (
        (mnist, False, "consider method.pin_level: true"),
        (mnist, True, None),
        (edm, True, "this teacher does see an image's mean level"),
        (edm, False, None),
    ):
        data = {"kind": "distill", "name": "a", "device": "cpu", "teacher": spec,
                "method": {"name": "diff-instruct", "pin_level": pin}}  # fmt: skip
        recipe = parse_recipe(data, "a.yaml")
        console = Console(record=True, width=400)
        _advise_on_level(recipe, load_teacher(recipe.teacher), console)
        said = console.export_text()
        assert (expected in said) if expected else said == "", (spec["kind"], pin, said)
