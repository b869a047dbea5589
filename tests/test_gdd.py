"""GDD / GDD-I (docs/algorithm.md, 'The baselines') against its definition: GAN losses, lazy R1, the
generator step, the GDD-I freezing rule, no teacher calls, images with both feature networks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emdctl.checkpoint import CheckpointManager
from emdctl.commands.distill import run_recipe
from emdctl.distributed import DistContext
from emdctl.errors import UserError
from emdctl.methods import GDD
from emdctl.methods.gdd import discriminator_loss, gdd_i_frozen, generator_loss, r1_penalty
from emdctl.networks import build_denoiser, preset_config
from emdctl.networks.discriminator import Discriminator, diff_augment
from emdctl.recipe import DiscriminatorSpec, parse_recipe
from emdctl.rng import IterationDraws
from emdctl.storage import load_model_dir
from emdctl.teachers import load_teacher

from .conftest import tiny_mixture_recipe


def mixture_recipe(seed=0, **overrides):
    return parse_recipe(
        tiny_mixture_recipe(**{"method": {"name": "gdd", "r1_gamma": 0.1, "r1_every": 2}, "seed": seed, **overrides}),
        "test",
    )


def build(seed=0, **overrides) -> GDD:
    recipe = mixture_recipe(seed, **overrides)
    m = GDD(recipe, load_teacher(recipe.teacher, seed=0), DistContext())
    m.initialize()
    return m


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def test_discriminator_learns_the_log_density_ratio():
    """The non-saturating loss's optimal logit is log p_real / p_fake. For real N(a, I) and fake
    N(b, I) in 2-D (random a, b, 1 to 2 apart) that is the linear function x.(a - b) - (|a|^2 - |b|^2) / 2."""
    g = torch.Generator().manual_seed(fresh_seed())
    a, u = torch.randn(2, generator=g), torch.randn(2, generator=g)
    b = a + (1 + torch.rand((), generator=g)) * u / u.norm()  # 1 to 2 apart: a ratio worth learning
    torch.manual_seed(fresh_seed())
    disc = Discriminator(DiscriminatorSpec(hidden=64, layers=2), (2,), 0)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    for i in range(600):
        if i == 400:  # a smaller last step size, so Adam's noise does not blur the optimum
            opt.param_groups[0]["lr"] = 3e-4
        real = a + torch.randn(512, 2, generator=g)
        fake = b + torch.randn(512, 2, generator=g)
        loss = discriminator_loss(disc(real), disc(fake), "non-saturating").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = (a + b) / 2 + torch.randn(2000, 2, generator=g)  # where both densities have mass
    want = x @ (a - b) - (a.square().sum() - b.square().sum()) / 2
    got = disc(x)[0][:, 0].detach()
    assert (got - want).abs().mean() < 0.1 * max(1.0, float(want.abs().mean()))  # <= 0.045 over 30 seeds
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.99


def test_losses_per_sample_match_their_formulas():
    g = torch.Generator().manual_seed(fresh_seed())
    real = [torch.randn(5, 7, generator=g), torch.randn(5, 1, generator=g)]
    fake = [torch.randn(5, 7, generator=g), torch.randn(5, 1, generator=g)]

    def sp(v):
        return torch.log1p(torch.exp(v))

    want_d = sum(sp(-r).mean(1) + sp(f).mean(1) for r, f in zip(real, fake, strict=True))
    want_g = sum(sp(-f).mean(1) for f in fake)
    assert torch.allclose(discriminator_loss(real, fake, "non-saturating"), want_d, atol=1e-6)
    assert torch.allclose(generator_loss(fake, "non-saturating"), want_g, atol=1e-6)
    hinge = sum((1 - r).clamp_min(0).mean(1) + (1 + f).clamp_min(0).mean(1) for r, f in zip(real, fake, strict=True))
    assert torch.allclose(discriminator_loss(real, fake, "hinge"), hinge, atol=1e-6)
    assert torch.allclose(generator_loss(fake, "hinge"), -sum(f.mean(1) for f in fake), atol=1e-6)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_r1_penalty_is_the_squared_input_gradient_float64(shape):
    """Against central finite differences of sum(D(x)) (float64, random heads and inputs)."""
    torch.manual_seed(fresh_seed())
    disc = Discriminator(DiscriminatorSpec(channels=4, hidden=16, layers=2), shape, 0).double()
    x = torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
    got = r1_penalty(disc(x), x).detach()
    h = 1e-6
    flat = x.detach().flatten(1)
    fd = torch.zeros_like(flat)
    for i in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, i] = h
        up = [v.sum(1) for v in disc((flat + e).reshape(x.shape))]
        dn = [v.sum(1) for v in disc((flat - e).reshape(x.shape))]
        fd[:, i] = (sum(up) - sum(dn)) / (2 * h)
    assert torch.allclose(got, fd.square().sum(1), rtol=1e-6, atol=1e-9)


def test_diff_augment_translation_cutout_color():
    g = torch.Generator().manual_seed(fresh_seed())
    n, h, w = 6, 16, 24
    u = torch.rand(n, 7, generator=g)
    # translation moves a single bright pixel by (dy, dx) in -h/8..h/8, -w/8..w/8; zeros come in
    x = torch.zeros(n, 2, h, w, dtype=torch.float64)
    a = torch.randint(0, h, (n,), generator=g)
    b = torch.randint(0, w, (n,), generator=g)
    x[torch.arange(n), 1, a, b] = 1.0
    y = diff_augment(x, ["translation"], u)
    dy = (u[:, 3] * (2 * (h // 8) + 1)).floor().long() - h // 8
    dx = (u[:, 4] * (2 * (w // 8) + 1)).floor().long() - w // 8
    for i in range(n):
        want = torch.zeros(2, h, w, dtype=torch.float64)
        if 0 <= a[i] + dy[i] < h and 0 <= b[i] + dx[i] < w:
            want[1, a[i] + dy[i], b[i] + dx[i]] = 1.0
        assert torch.equal(y[i], want), i
    # cutout zeroes one h/2 x w/2 square inside the image, nothing else
    y = diff_augment(torch.ones(n, 3, h, w), ["cutout"], u)
    assert torch.equal((y == 0).flatten(1).sum(1), torch.full((n,), 3 * (h // 2) * (w // 2)))
    rows_hit = (y[:, 0] == 0).any(2)
    assert torch.equal(rows_hit.sum(1), torch.full((n,), h // 2))
    # color: brightness alone when saturation and contrast factors are 1; saturation 0 is grey
    x = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64)
    v = u.clone().double()
    v[:, 1], v[:, 2] = 0.5, 0.5
    assert torch.allclose(diff_augment(x, ["color"], v), x + (v[:, :1, None, None] - 0.5), atol=1e-12)
    v[:, 1] = 0.0
    grey = diff_augment(x, ["color"], v)
    assert torch.allclose(grey, grey[:, :1].expand_as(grey), atol=1e-12)
    # every sample depends on its own draws only, and the whole map is differentiable
    ops = ["color", "translation", "cutout"]
    both = diff_augment(x, ops, u)
    assert torch.allclose(both[2:3], diff_augment(x[2:3], ops, u[2:3]), atol=1e-12)
    xs = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: diff_augment(t, ops, u[:2]), (xs,))


def test_generator_step_is_the_gan_loss_gradient():
    """The shared regression with d = -grad_x l and w = 1 has the gradient of the generator's GAN
    loss mean_i l(D(g(z_i))), computed here directly by autograd through the discriminator."""
    m = build(seed=fresh_seed() % 1000)
    m.opt_gen.zero_grad(set_to_none=True)
    draws = IterationDraws(m.recipe.seed, 3, m.device)
    m._real_labels = {}
    m.generator_gradients(draws)
    got = torch.cat([p.grad.flatten() for p in m.generator.parameters()])
    m.opt_gen.zero_grad(set_to_none=True)
    rows = m.batching.micro_rows()[0]
    x = m.generator(draws.normal("gen/z", m.global_shape(), rows))
    generator_loss(m.fake(x), "non-saturating").mean().backward()
    want = torch.cat([p.grad.flatten() for p in m.generator.parameters()])
    assert got.norm() > 0
    assert (got - want).norm() < 1e-5 * want.norm()  # float32 rounding: ~4e-7 seen


def test_training_never_calls_the_teacher_on_vectors():
    m = build()

    def refuse(*args, **kwargs):
        raise AssertionError("GDD called the teacher")

    m.teacher.forward = refuse
    for it in range(4):
        stats = m.train_step(it)
    assert math.isfinite(float(stats["loss/gen"])) and "gdd/r1_penalty" not in stats  # iteration 3: no R1
    assert "gdd/r1_penalty" in m.train_step(4)  # r1_every = 2


def test_gdd_i_freezes_85_percent_of_ddpmpp():
    """docs/algorithm.md: GDD-I freezes ~85% of the parameters. On the CIFAR-10 DDPM++ (55.7M) the rule
    (3x3 convs of U-Net blocks + attention output projections) freezes 85.4%."""
    with torch.device("meta"):
        den = build_denoiser(preset_config("ddpmpp", "edm", (3, 32, 32), 0, {}))
    frozen = set(gdd_i_frozen(den))
    total = sum(p.numel() for p in den.parameters())
    share = sum(p.numel() for n, p in den.named_parameters() if n in frozen) / total
    assert 55.5e6 < total < 56e6 and 0.84 < share < 0.86
    kinds = {n.split(".")[-2] for n in frozen}
    assert kinds == {"conv0", "conv1", "proj"}
    assert not any(n.startswith(("model.map_", "model.enc.32x32_conv", "model.dec.32x32_aux")) for n in frozen)


def image_recipe(root, features="teacher", discriminator=None, **kw):
    r = {
        "kind": "distill",
        "name": "g",
        "device": "cpu",
        "teacher": {"kind": "pretrained", "path": str(root / "teacher")},
        "generator": {"sigma_init": 80},
        "method": {
            "name": "gdd",
            "data": {"path": str(root / "data.npz"), "labels": True, "xflip": True},
            "discriminator": {
                "features": features,
                "channels": 8,
                "augment": ["color", "translation", "cutout"],
                **(discriminator or {}),
            },
            "freeze": "gdd-i",
            "r1_every": 2,
        },
        "optim": {"lr_gen": 1e-3, "lr_fake": 1e-3},
        "batch": {"size": 8, "micro": 4},
        "duration": 32,
        "logging": {"every": 8, "grid_every": 32, "grid_size": 4, "progress": False},
        "checkpoint": {"every": 16},
    }
    r.update(kw)
    return parse_recipe(r, "gdd.yaml")


@pytest.fixture(scope="module")
def effnet_weights(tmp_path_factory):
    """A randomly initialized torchvision EfficientNet-B0 with random BatchNorm statistics, saved as
    torchvision saves its weights (no download: the ImageNet weights are not needed to test the
    plumbing)."""
    from torchvision.models import efficientnet_b0

    torch.manual_seed(1)
    net = efficientnet_b0()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("effnet") / "efficientnet_b0.pth"
    torch.save(net.state_dict(), path)
    return path


def effnet_spec(path, resolution=64, channels=8):
    return DiscriminatorSpec(
        features="efficientnet", feature_resolution=resolution, feature_weights=path, channels=channels
    )


def test_efficientnet_features_against_float64_written_out(effnet_weights):
    """The feature maps equal a float64 computation written out from the spec: [-1, 1] -> ImageNet
    normalization -> bilinear resize -> torchvision's trunk split after features[2], [3], [5], [7]
    -> 1x1 channel mixing -> top-down (add, upsample x2, 1x1) scale mixing; grayscale = gray RGB."""
    from torchvision.models import efficientnet_b0

    seed = fresh_seed()
    torch.manual_seed(seed)
    disc = Discriminator(effnet_spec(effnet_weights), (3, 16, 16), 0)
    feats = disc.features
    ref_net = efficientnet_b0()
    ref_net.load_state_dict(torch.load(effnet_weights, weights_only=True))
    ref_net = ref_net.double().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        got = feats(x)
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
        h = F.interpolate(((x.double() + 1) / 2 - mean) / std, size=(64, 64), mode="bilinear", align_corners=False)
        stages = []
        for i in range(8):
            h = ref_net.features[i](h)
            if i in (2, 3, 5, 7):
                stages.append(h)
        assert [t.shape[1] for t in stages] == [24, 40, 112, 320]
        assert [t.shape[-1] for t in stages] == [16, 8, 4, 2]  # strides 4..32 of 64

        def conv1x1(conv, t):
            return F.conv2d(t, conv.weight.double(), conv.bias.double())

        def up(t):
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)

        mixed = [conv1x1(feats.mix[i], stages[i]) for i in range(4)]
        want = [None] * 4
        want[3] = conv1x1(feats.fuse[3].conv, up(mixed[3]))
        for i in (2, 1, 0):
            want[i] = conv1x1(feats.fuse[i].conv, up(want[i + 1] + mixed[i]))
    assert [t.shape[1:] for t in got] == [(8, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    gray = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.manual_seed(seed)  # the same random mixing convs
    disc1 = Discriminator(effnet_spec(effnet_weights), (1, 16, 16), 0)
    with torch.no_grad():
        for a, b in zip(disc1.features(gray), feats(gray.expand(-1, 3, -1, -1)), strict=True):
            assert torch.equal(a, b)


def test_efficientnet_trunk_stays_frozen_with_imagenet_statistics(effnet_weights):
    """In training mode only the heads learn: the trunk and the mixing convs get no gradients and
    BatchNorm keeps its statistics; the input gradient (the generator's signal, R1) flows."""
    torch.manual_seed(fresh_seed())
    disc = Discriminator(effnet_spec(effnet_weights), (3, 16, 16), 3).train()
    before = {k: v.clone() for k, v in disc.features.state_dict().items()}
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    logits = disc(x, labels)
    pen = r1_penalty(logits, x)
    (generator_loss(logits, "non-saturating").sum() + pen.sum()).backward()
    assert torch.isfinite(pen).all() and (pen > 0).all()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.features.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    for k, v in disc.features.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in disc.features.parameters())


def test_efficientnet_weights_errors(effnet_weights, image_setup, tmp_path):
    from emdctl import hub
    from emdctl.networks.discriminator import EFFICIENTNET_B0_URL

    with pytest.raises(UserError) as e:  # offline (conftest), nothing cached: what to fetch, where to put it
        Discriminator(DiscriminatorSpec(features="efficientnet", feature_resolution=32), (3, 16, 16), 0)
    cached = hub.cached_path_for(EFFICIENTNET_B0_URL)
    assert EFFICIENTNET_B0_URL in e.value.message and str(cached) in e.value.message
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(effnet_weights.read_bytes())  # not the real file: its sha256 lacks the name's prefix
    with pytest.raises(UserError, match="does not match the expected 7f5810bc"):
        Discriminator(DiscriminatorSpec(features="efficientnet", feature_resolution=32), (3, 16, 16), 0)
    cached.unlink()
    with pytest.raises(UserError, match=r"feature_weights: .* does not exist"):
        Discriminator(effnet_spec(tmp_path / "missing.pth"), (3, 16, 16), 0)
    torch.save({"features.0.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not torchvision's EfficientNet-B0"):
        Discriminator(effnet_spec(tmp_path / "other.pth"), (3, 16, 16), 0)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        Discriminator(effnet_spec(tmp_path / "junk.pth"), (3, 16, 16), 0)
    with pytest.raises(UserError, match="1- or 3-channel"):
        Discriminator(effnet_spec(effnet_weights), (4, 16, 16), 0)
    with pytest.raises(UserError, match=r"method\.discriminator\.feature_resolution: .*multiple of 32"):
        image_recipe(image_setup, "efficientnet", {"feature_resolution": 48})


@pytest.mark.parametrize("features", ["input", "teacher", "efficientnet"])
@pytest.mark.slow
def test_images_resume_bit_for_bit_and_gdd_i_keeps_frozen_weights(image_setup, tmp_path, features, request):
    disc = {}
    if features == "efficientnet":
        disc = {"feature_resolution": 32, "feature_weights": str(request.getfixturevalue("effnet_weights"))}
    run_recipe(image_recipe(image_setup, features, disc), run_dir=tmp_path / "full")
    run_recipe(image_recipe(image_setup, features, disc, duration=16), run_dir=tmp_path / "split")
    run_recipe(image_recipe(image_setup, features, disc), run_dir=tmp_path / "split", resume=True)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    assert a.keys() == b.keys() and any(k.startswith("net.discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if features == "efficientnet":  # the trunk is still the given weights
        given = torch.load(request.getfixturevalue("effnet_weights"), weights_only=True)
        trunk = {k.removeprefix("net.discriminator.features.trunk."): v for k, v in a.items()
                 if k.startswith("net.discriminator.features.trunk.")}  # fmt: skip
        assert trunk and all(torch.equal(v, given[f"features.{k}"]) for k, v in trunk.items())
    # GDD-I: the frozen 3x3 convs and attention projections are still the teacher's; the rest moved
    _, teacher = load_model_dir(image_setup / "teacher", expect_kind="denoiser")
    _, gen = load_model_dir(tmp_path / "full" / "generator", expect_kind="generator")
    frozen = {n.removeprefix("denoiser.") for n in gdd_i_frozen(build_denoiser_like(image_setup))}
    moved = {n for n in teacher if not torch.equal(teacher[n], gen[f"denoiser.{n}"])}
    assert frozen and not (moved & frozen)
    assert any("affine" in n for n in moved) and any("norm" in n for n in moved)
    cfg = json.loads((tmp_path / "full" / "generator" / "config.json").read_text())
    assert cfg["method"] == "gdd" and cfg["sigma_star"] == 80


def build_denoiser_like(root):
    from emdctl.teachers import load_pretrained_denoiser

    return load_pretrained_denoiser(root / "teacher")


def test_recipe_and_teacher_errors(image_setup, tmp_path):
    with pytest.raises(UserError, match=r"method\.data: gdd trains against real images"):
        image_recipe(image_setup, method={"name": "gdd"})
    with pytest.raises(UserError, match=r"method\.data: a mixture teacher's real data is the mixture"):
        mixture_recipe(**{"method.data": {"path": "x.npz"}})
    with pytest.raises(UserError, match=r"method\.discriminator\.augment: augmentations are for images"):
        mixture_recipe(**{"method.discriminator": {"augment": ["color"]}})
    with pytest.raises(UserError, match=r"method\.freeze: gdd-i .* has none"):
        build(**{"method.freeze": "gdd-i"})
    with pytest.raises(UserError, match=r"method\.discriminator\.features: vector data"):
        build(**{"method.discriminator": {"features": "teacher"}})
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8), arr_1=np.zeros(4, dtype=np.int64))
    recipe = image_recipe(image_setup, method={"name": "gdd", "data": {"path": str(tmp_path / "small.npz")}})
    with pytest.raises(UserError, match=r"method\.data: .* holds \(3, 8, 8\) images, the teacher makes \(3, 16, 16\)"):
        GDD(recipe, load_teacher(recipe.teacher), DistContext())
    recipe = image_recipe(image_setup, method={"name": "gdd", "data": {"path": str(image_setup / "data.npz")}})
    with pytest.raises(UserError, match=r"class-conditional; .* needs labels"):
        GDD(recipe, load_teacher(recipe.teacher), DistContext())


@pytest.mark.slow
def test_distill_gdd_on_the_mixture_end_to_end(tmp_path):
    """`emdctl distill` then `emdctl evaluate modes` on the 8 unequal Gaussians: the generator
    starts off the modes (the teacher's denoiser at sigma* = 2.5 averages them) and 100k images of
    GAN training put most of its mass on them (off-mode 1.0 -> 0.28, TV 0.13 -> 0.02, 8 modes here)."""
    from typer.testing import CliRunner

    from emdctl.cli import app

    data = tiny_mixture_recipe(
        **{
            "method": {"name": "gdd", "discriminator": {"hidden": 128, "layers": 3}, "r1_gamma": 0.1, "r1_every": 4},
            "teacher.network": {"hidden": 128, "layers": 3, "emb_dim": 32},
            "teacher.fit": {"steps": 800, "batch": 1024},
            "optim": {"lr_gen": 1e-4, "lr_fake": 1e-4},
            "batch.size": 512,
            "duration": "100k",
            "ema.halflife": "20k",
            "logging": {"every": "50k", "grid_every": "100k", "grid_size": 16, "progress": False, "eval_every": "100k"},
            "checkpoint": {"every": "100k", "keep": 1},
        }
    )
    p = tmp_path / "gdd.yaml"
    p.write_text(json.dumps(data))
    runner = CliRunner()
    res = runner.invoke(app, ["distill", str(p), "--runs-root", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/tv_distance" in r]
    first = evals[0]
    assert first["images"] == 0 and first["eval/off_mode_fraction"] > 0.9
    res = runner.invoke(app, ["evaluate", "modes", str(run), "--json", str(tmp_path / "modes.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "modes.json").read_text())[str(run)]
    assert m["off_mode_fraction"] < 0.5 * first["eval/off_mode_fraction"]
    assert m["tv_distance"] < 0.5 * first["eval/tv_distance"] and m["modes_covered"] >= 5  # 0.99 -> 0.36, 6 here
    assert (run / "curves.png").is_file()
    assert json.loads((run / "generator" / "config.json").read_text())["method"] == "gdd"


def test_teacher_features_and_gdd_i_refuse_the_mnist_ddpm(shared_data):
    """The MNIST DDPM's U-Net (Pulfer's) has no EDM-style encoder blocks: both options say so."""
    teacher = {"kind": "ddpm-pulfer", "path": str(shared_data / "teachers" / "ddpm_mnist_pulfer_myunet.pt")}
    base = {
        "kind": "distill",
        "device": "cpu",
        "teacher": teacher,
        "batch": {"size": 4},
        "logging": {"progress": False},
    }
    data = {"path": str(shared_data / "mnist")}
    for method, match in (
        ({"name": "gdd", "data": data, "discriminator": {"features": "teacher"}}, r"'teacher' needs a SongUNet"),
        ({"name": "gdd", "data": data, "freeze": "gdd-i"}, r"method\.freeze: gdd-i"),
    ):
        recipe = parse_recipe({**base, "method": method}, "mnist-gdd.yaml")
        with pytest.raises(UserError, match=match):
            GDD(recipe, load_teacher(recipe.teacher), DistContext())
