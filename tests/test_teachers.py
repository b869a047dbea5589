"""Teachers: the MNIST DDPM in EDM form, safe EDM-pickle import, conversion, downloads, bad files."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from emdctl import hub
from emdctl.data import to_model_range
from emdctl.errors import UserError
from emdctl.evaluation.stats import images_of
from emdctl.networks import build_denoiser, preset_config
from emdctl.networks.pulfer_unet import PulferUNet
from emdctl.rng import PerSeedRandom
from emdctl.solvers import ddpm_sampler
from emdctl.teachers import load_ddpm_pulfer, load_pretrained_denoiser
from emdctl.teachers.convert import convert_edm_pickle
from emdctl.teachers.edm_pickle import load_edm_pickle

from .conftest import fresh
from .edm_pickles import write_edm_pickle, write_malicious_pickle

TEACHER = "teachers/ddpm_mnist_pulfer_myunet.pt"


def test_mnist_teacher_loads_strict(shared_data):
    den = load_ddpm_pulfer(
        shared_data / TEACHER, sha256="f7c506e4fd00981e979a9c84485760fa430bf4b1a81b6ead8e10e4cf9e3fbe68"
    )
    assert den.img_shape == (1, 28, 28) and den.is_discrete
    assert sum(p.numel() for p in den.parameters()) == 606_852
    # sigma grid: sqrt((1 - abar) / abar) of the linear-beta schedule, rounded in log-space
    assert den.round_sigma(torch.tensor([den.grid[500].item() * 1.001])).item() == pytest.approx(den.grid[500].item())


@pytest.mark.slow
def test_mnist_teacher_in_edm_form_reproduces_the_plain_ddpm_loop(shared_data):
    """Same seeds, same pixels: the EDM-interface ancestral sampler vs the tutorial's own loop (float64)."""
    den = load_ddpm_pulfer(shared_data / TEACHER).double().eval()
    seeds = [3, 11]
    rng = PerSeedRandom(seeds)  # one generator per seed: the latent first, then the step noises
    x_emdctl = ddpm_sampler(den, rng.randn((1, 28, 28)).double(), None, rng)

    unet = PulferUNet().double().eval()
    unet.load_state_dict({k.removeprefix("network."): v.double() for k, v in den.state_dict().items()})
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, 0)
    rng = PerSeedRandom(seeds)
    x = rng.randn((1, 28, 28)).double()
    with torch.no_grad():
        for t in range(999, -1, -1):
            eta = unet(x, torch.full((len(seeds), 1), t, dtype=torch.long))
            x = (1 / alphas[t].sqrt()) * (x - (1 - alphas[t]) / (1 - alpha_bars[t]).sqrt() * eta)
            if t > 0:
                x = x + betas[t].sqrt() * rng.randn((1, 28, 28)).double()
    assert torch.allclose(x_emdctl, x, atol=1e-8, rtol=0)
    to8 = lambda v: (v * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # noqa: E731
    assert torch.equal(to8(x_emdctl), to8(x))


def test_mnist_teacher_cannot_see_an_images_dc_level(shared_data):
    """The checkpoint's first LayerNorm spans the whole image, so D(x + c; sigma) = D(x; sigma) + c
    at every noise level: its score has no restoring force on the mean brightness (its density is
    flat along that direction). Kept on purpose (it is the teacher); docs/results/mnist-ddpm.md explains what
    that does to distillation. Float64, fresh random images, offsets and noise levels."""
    den = load_ddpm_pulfer(shared_data / TEACHER).double().eval()
    g = fresh()
    sigma = den.round_sigma(torch.exp(torch.empty(6, dtype=torch.float64).uniform_(-3, 4, generator=g)))
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    x = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    c = torch.randn(6, 1, 1, 1, generator=g, dtype=torch.float64) * 5
    with torch.no_grad():
        shifted, plain = den(x + c, sigma, None), den(x, sigma, None)
        mirrored = den(x.flip(-1), sigma, None)
    assert torch.allclose(shifted - c, plain, atol=1e-8, rtol=0)
    # ... while a change of the image's content (not its mean) does change the output.
    assert (mirrored - plain.flip(-1)).abs().max() > 1e-3


def test_mnist_teacher_eps_prediction_is_biased_towards_dark(shared_data):
    """Why every student of this teacher drifts to black (docs/results/mnist-ddpm.md): the teacher cannot see
    the DC part of the noise (above), so the best it could predict for it is 0, but on real MNIST
    noised at several levels its predicted noise has a positive mean, i.e. its denoiser darkens by
    ~sigma * 0.01. A fake score of the same architecture is DC-blind too and can only learn ~0 there
    (the noise's DC part is independent of what it sees), so Delta keeps a
    constant dark push along a direction with no restoring force. Fresh noise per run; the mean
    is ~10 standard errors from 0 at this size."""
    den = load_ddpm_pulfer(shared_data / TEACHER).eval()
    real = to_model_range(images_of(shared_data / "mnist", 256))
    g = fresh()
    errors = []
    for s in (0.3, 1.0, 3.0, 10.0):
        sigma = den.round_sigma(torch.full((len(real),), s, dtype=torch.float64)).float()
        eps = torch.randn(real.shape, generator=g)
        x = real + sigma.reshape(-1, 1, 1, 1) * eps
        with torch.no_grad():
            eps_hat = (x - den(x, sigma, None)) / sigma.reshape(-1, 1, 1, 1)
        errors.append((eps_hat - eps).mean((1, 2, 3)))
    err = torch.cat(errors).double()
    assert err.mean() > 5 * err.std() / math.sqrt(len(err))


def test_bad_teacher_files(tmp_path, shared_data):
    with pytest.raises(UserError, match="no such teacher checkpoint"):
        load_ddpm_pulfer(tmp_path / "missing.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((shared_data / TEACHER).read_bytes()[:100_000])
    with pytest.raises(UserError, match="cannot read the teacher checkpoint safely"):
        load_ddpm_pulfer(trunc)
    with pytest.raises(UserError, match="sha256 does not match"):
        load_ddpm_pulfer(shared_data / TEACHER, sha256="0" * 64)
    other = tmp_path / "other.pt"
    torch.save({"network.conv_out.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(UserError, match="do not fit this architecture"):
        load_ddpm_pulfer(other)
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(1)}, evil)  # a zip checkpoint whose pickle calls os.system:
    write_malicious_pickle(tmp_path / "evil.pkl", marker)
    import zipfile

    with zipfile.ZipFile(evil, "a") as z:
        name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
    raw = (tmp_path / "evil.pkl").read_bytes()
    with zipfile.ZipFile(evil) as zin, zipfile.ZipFile(tmp_path / "evil2.pt", "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, raw if item.filename == name else zin.read(item.filename))
    with pytest.raises(UserError):
        load_ddpm_pulfer(tmp_path / "evil2.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# EDM pickles


def small_edm(arch="ddpmpp", label_dim=10):
    kwargs = {
        "ddpmpp": dict(
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            dropout=0.13,
            augment_dim=9,
            embedding_type="positional",
            encoder_type="standard",
            decoder_type="standard",
            channel_mult_noise=1,
            resample_filter=[1, 1],
        ),
        "adm": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1),
    }[arch]
    torch.manual_seed(0)
    den = build_denoiser({**preset_config(arch, "edm", (3, 16, 16), label_dim, {}), "arch_kwargs": kwargs}).eval()
    for p in den.parameters():
        p.data += 0.02 * torch.randn_like(p)
    return den, kwargs


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_edm_pickle_import_without_running_its_code(tmp_path, arch):
    den, kwargs = small_edm(arch)
    marker = tmp_path / "executed"
    pkl = write_edm_pickle(den, kwargs, tmp_path / f"edm-{arch}.pkl", marker)
    # Sanity: the stream really names the persistence reconstructor, as official pickles do.
    assert b"torch_utils.persistence" in pkl.read_bytes() and b"_reconstruct_persistent_obj" in pkl.read_bytes()
    loaded = load_edm_pickle(pkl)
    assert not marker.exists()  # the embedded module source was never executed
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0]), torch.eye(10)[[1, 7]]
    assert torch.equal(loaded(x, sigma, labels), den(x, sigma, labels))
    assert loaded.config()["arch_kwargs"]["model_channels"] == kwargs["model_channels"]


def test_edm_pickle_convert_once(tmp_path):
    den, kwargs = small_edm()
    pkl = write_edm_pickle(den, kwargs, tmp_path / "edm.pkl", tmp_path / "executed")
    out = convert_edm_pickle(str(pkl), tmp_path / "converted")
    again = load_pretrained_denoiser(out)
    x, s, y = torch.randn(1, 3, 16, 16), torch.tensor([1.0]), torch.eye(10)[:1]
    assert torch.equal(again.eval()(x, s, y), den(x, s, y))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pkl = write_malicious_pickle(tmp_path / "evil.pkl", marker)
    with pytest.raises(UserError, match="refusing to load (posix|os).system"):
        load_edm_pickle(pkl)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [b"", b"\x80\x04garbage", pickle.dumps({"ema": 3})])
def test_broken_pickles_give_clear_errors(tmp_path, payload):
    p = tmp_path / "bad.pkl"
    p.write_bytes(payload)
    with pytest.raises(UserError):
        load_edm_pickle(p)


def test_truncated_edm_pickle(tmp_path):
    den, kwargs = small_edm()
    pkl = write_edm_pickle(den, kwargs, tmp_path / "edm.pkl", tmp_path / "executed")
    pkl.write_bytes(pkl.read_bytes()[: len(pkl.read_bytes()) // 2])
    with pytest.raises(UserError, match="corrupt or truncated|not a readable"):
        load_edm_pickle(pkl)


def test_offline_download_says_what_to_fetch(tmp_path):
    url = hub.OFFICIAL_EDM["edm-imagenet-64x64-cond-adm"]
    with pytest.raises(UserError) as e:
        convert_edm_pickle("edm-imagenet-64x64-cond-adm", tmp_path / "out")
    msg = e.value.message
    assert url in msg and str(hub.cached_path_for(url)) in msg and "EMDCTL_OFFLINE" in msg


def test_cached_download_is_checked(tmp_path):
    url = "https://example.invalid/weights.bin"
    path = hub.cached_path_for(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"abc")
    assert hub.fetch(url) == path  # cached: no network; the hash is recorded on first use
    path.write_bytes(b"abd")
    with pytest.raises(UserError, match="changed since it was downloaded"):
        hub.fetch(url)
    path.write_bytes(b"abc")
    with pytest.raises(UserError, match="does not match the expected"):
        hub.fetch(url, sha256="0" * 64)


def test_vp_ve_iddpm_preconditioners_are_consistent():
    """Every preconditioner is a denoiser: with its network zeroed it returns x (VP/VE/iDDPM) or
    c_skip x (EDM); rounding is the identity on continuous ones."""
    for precond in ("vp", "ve", "iddpm"):
        cfg = {
            "precond": precond,
            "precond_kwargs": {},
            "img_shape": [3, 16, 16],
            "label_dim": 0,
            "arch": "dhariwalunet",
            "arch_kwargs": dict(model_channels=32, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0),
        }
        den = build_denoiser(cfg).eval()
        x = torch.randn(2, 3, 16, 16)
        s = torch.tensor([den.sigma_min * 2, min(den.sigma_max / 2, 10.0)])
        assert torch.allclose(den(x, den.round_sigma(s)), x, atol=1e-6), precond
    iddpm = build_denoiser({**cfg, "precond": "iddpm"})
    # EDM's iDDPM grid u_j: increasing after the flip, from ~0.002 to far above the samplers' sigma_max = 80
    assert (iddpm.grid.diff() > 0).all() and iddpm.sigma_min < 0.01 and iddpm.sigma_max > 80
    assert math.isclose(float(iddpm.round_sigma(torch.tensor([80.0]))), 80.0, rel_tol=0.05)


def test_level_blind_teachers_are_recognised(shared_data, image_setup):
    """Teacher.follows_level_shifts, which decides run_recipe's advice on method.pin_level: true for
    the MNIST DDPM (proved exactly above), false for an EDM DDPM++ teacher (class-conditional) and
    for a mixture."""
    from emdctl.recipe import parse_recipe
    from emdctl.teachers import load_teacher

    from .conftest import tiny_mixture_recipe

    def teacher(spec):
        return load_teacher(parse_recipe({**tiny_mixture_recipe(), "teacher": spec}, "t").teacher)

    assert teacher({"kind": "ddpm-pulfer", "path": str(shared_data / TEACHER)}).follows_level_shifts()
    assert not teacher({"kind": "pretrained", "path": str(image_setup / "teacher")}).follows_level_shifts()
    assert not load_teacher(parse_recipe(tiny_mixture_recipe(), "t").teacher).follows_level_shifts()
