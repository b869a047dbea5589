"""Evaluation: metrics behave on known cases, feature spaces load safely, generators are evaluated
in memory, torch-fidelity's ONNX input works with emdctl's feature space."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from emdctl.commands.evaluate import evaluate_command
from emdctl.data import open_dataset
from emdctl.errors import UserError
from emdctl.evaluation import inception
from emdctl.evaluation.classifier import train_feature_net
from emdctl.evaluation.fidelity import (
    compute_metrics,
    features_of_dataset,
    get_reference,
    open_feature_space,
    reference_from_features,
)
from emdctl.evaluation.mixture import mode_metrics, sliced_wasserstein
from emdctl.teachers.mixture import GaussianMixture, preset_mixture

from .conftest import fresh, make_generator


def blobs(n, classes=range(10), seed=0, noise=0.0):
    """16x16 grey images: a bright square whose position encodes the class (0..9), plus jitter."""
    g = np.random.default_rng(seed)
    x = g.normal(40, 10, size=(n, 16, 16, 1))
    y = g.choice(list(classes), size=n)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 5)
        dr, dc = g.integers(0, 3, size=2)
        x[i, 2 + 7 * r + dr : 6 + 7 * r + dr, 1 + 3 * col + dc : 4 + 3 * col + dc] += 180
    x = x + g.normal(0, noise, size=x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_npz(path, x, y=None):
    np.savez(path, arr_0=x, **({"arr_1": y} if y is not None else {}))
    return path


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    x, y = blobs(3000)
    data = write_npz(tmp / "train.npz", x, y)
    info = train_feature_net(data, tmp / "features.safetensors", epochs=2, batch=128, lr=3e-3, log=lambda m: None)
    assert info["held_out_accuracy"] > 0.9
    return tmp / "features.safetensors"


@pytest.fixture(scope="module")
def fs(feature_file):
    return open_feature_space(f"classifier:{feature_file}")


def feats(fs, tmp_path, x, name):
    return features_of_dataset(fs, open_dataset(write_npz(tmp_path / f"{name}.npz", x)), 256)


@pytest.mark.slow
def test_fd_of_a_set_against_itself_is_zero(fs, tmp_path):
    a = feats(fs, tmp_path, blobs(1500, seed=1)[0], "a")
    ref = reference_from_features(a, fs, {})
    m = compute_metrics(["fid", "prc"], a, ref, fs)
    # zero up to the eigen-solver's rounding, relative to the size of the features' covariance
    # (KID's unbiased estimator is checked on independent samples in the next test: against the
    # very same set its cross term holds identical pairs and it comes out negative by design)
    assert abs(m["fd"]) < 1e-6 * float(np.trace(ref.sigma))
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)


@pytest.mark.slow
def test_fd_grows_monotonically_with_noise(fs, tmp_path):
    ref = reference_from_features(feats(fs, tmp_path, blobs(1200, seed=2)[0], "ref"), fs, {})
    values = []
    for noise in (0, 20, 45, 90):
        x = blobs(1200, seed=3, noise=noise)[0]
        values.append(compute_metrics(["fid", "kid"], feats(fs, tmp_path, x, f"n{noise}"), ref, fs))
    fds = [v["fd"] for v in values]
    kids = [v["kid"] for v in values]
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False)), fds
    assert all(a < b for a, b in zip(kids, kids[1:], strict=False)), kids
    assert abs(kids[0]) < 0.02 * kids[-1]  # same distribution, other samples: KID ~ 0


def test_precision_recall_and_inception_score_on_known_cases(fs, tmp_path):
    full = reference_from_features(feats(fs, tmp_path, blobs(2000, seed=4)[0], "full"), fs, {})
    half = feats(fs, tmp_path, blobs(2000, classes=range(5), seed=5)[0], "half")
    m = compute_metrics(["prc", "isc"], half, full, fs)
    assert m["precision"] > 0.9 and m["recall"] < 0.75  # dropped modes: precise, low recall
    balanced = compute_metrics(["isc"], feats(fs, tmp_path, blobs(2000, seed=6)[0], "bal"), None, fs)["is"]
    single = compute_metrics(["isc"], feats(fs, tmp_path, blobs(2000, classes=[3], seed=7)[0], "one"), None, fs)["is"]
    assert balanced > 7 and single < 1.5


def test_reference_cache_and_mismatched_feature_space(fs, feature_file, tmp_path):
    data = write_npz(tmp_path / "ref.npz", blobs(500, seed=8)[0])
    r1 = get_reference(data, fs, 128, None, log=lambda m: None)
    r2 = get_reference(data, fs, 128, None, log=lambda m: None)  # from the cache
    assert np.array_equal(r1.mu, r2.mu)
    other_file = tmp_path / "other.safetensors"
    x, y = blobs(600, seed=9)
    train_feature_net(write_npz(tmp_path / "t.npz", x, y), other_file, epochs=1, batch=128, log=lambda m: None)
    from emdctl.evaluation.fidelity import load_reference, reference_cache_path

    with pytest.raises(UserError, match="feature space"):
        load_reference(reference_cache_path(data, fs, None), open_feature_space(f"classifier:{other_file}"))


def test_missing_inception_weights_offline():
    with pytest.raises(UserError) as e:
        open_feature_space("inception")
    msg = e.value.message
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "--inception-weights" in msg
    assert "classifier:PATH" in msg


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Random Inception weights in pytorch-fid's (torchvision) layout and in torch-fidelity's."""
    import torchvision

    tmp = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
    sd = net.state_dict()
    torch.save(sd, tmp / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(inception.convert_state_dict(sd), tmp / "weights-inception-2015-12-05-6726825d.pth")
    return tmp / "pt_inception-2015-12-05-6726825d.pth", tmp / "weights-inception-2015-12-05-6726825d.pth"


def test_both_published_inception_layouts_load_to_the_same_network(inception_files):
    a = open_feature_space("inception", inception_files[0])
    b = open_feature_space("inception", inception_files[1])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fa, fb = a.extract(x), b.extract(x)
    assert fa["2048"].shape == (2, 2048) and torch.equal(fa["2048"], fb["2048"])
    assert torch.equal(a.extract(x[:, :1])["2048"], a.extract(x[:, :1].expand(-1, 3, -1, -1))["2048"])  # grey


def test_inception_weights_never_run_code(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"Conv2d_1a_3x3.conv.weight": Evil()}, f)
    with pytest.raises(UserError, match="not a readable Inception weights file"):
        open_feature_space("inception", bad)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UserError, match="does not fit Inception-v3"):
        open_feature_space("inception", wrong)


# --------------------------------------------------------------------------------------------
# Generators


@pytest.fixture(scope="module")
def gray_generator(tmp_path_factory):
    return make_generator(tmp_path_factory.mktemp("g") / "generator", shape=(1, 16, 16), attn=())


def test_evaluate_a_generator_in_memory_with_seed_ranges(gray_generator, feature_file, tmp_path):
    ref = write_npz(tmp_path / "ref.npz", blobs(400, seed=10)[0])
    res = evaluate_command(
        metrics=["all"],
        source=gray_generator,
        ref=ref,
        features=f"classifier:{feature_file}",
        n=0,
        seed_ranges=[list(range(0, 300)), list(range(300, 600))],
        batch=128,
        device="cpu",
        log=lambda m: None,
    )
    assert len(res["runs"]) == 2 and res["comparable_to_published"] is False
    assert "not comparable to published FID" in res["feature_space"]
    s = res["summary"]["fd"]
    assert s["min"] <= s["mean"] and s["min"] > 0
    # the same images written by `emdctl sample` give the same FD
    from emdctl.commands.sample import sample_command

    sample_command(source=gray_generator, teacher_recipe=None, seeds=list(range(300)), out_dir=tmp_path / "s",
                   batch=64, steps=1, fmt="npz", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                   show_progress=False)  # fmt: skip
    res2 = evaluate_command(
        metrics=["fid"],
        source=tmp_path / "s" / "samples.npz",
        ref=ref,
        features=f"classifier:{feature_file}",
        n=300,
        seed_ranges=None,
        batch=128,
        device="cpu",
        log=lambda m: None,
    )
    assert res2["runs"][0]["fd"] == pytest.approx(res["runs"][0]["fd"], rel=1e-6)


@pytest.mark.slow
def test_torch_fidelity_onnx_input_with_emdctl_features(gray_generator, feature_file, tmp_path):
    pytest.importorskip("onnxruntime")
    import torch_fidelity

    from emdctl.commands.export import export_command
    from emdctl.data import ImagesOnly
    from emdctl.evaluation import classifier

    out = export_command(source=gray_generator, fmt="onnx", out=tmp_path / "onnx")
    assert out["verified"]["max_abs_diff"] <= 1
    classifier.register()
    ref = ImagesOnly(open_dataset(write_npz(tmp_path / "ref.npz", blobs(200, seed=11)[0])))
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    m = torch_fidelity.calculate_metrics(
        input1=out["path"],
        input1_model_z_size=cfg["z_size"],
        input1_model_z_type="normal",
        input1_model_num_classes=0,
        input1_model_num_samples=200,
        input2=ref,
        fid=True,
        cuda=False,
        feature_extractor=classifier.NAME,
        feature_extractor_weights_path=str(feature_file),
        verbose=False,
        cache=False,
    )
    assert np.isfinite(m["frechet_inception_distance"]) and m["frechet_inception_distance"] > 0


def test_pixel_statistics_on_constructed_images(tmp_path):
    """Flat kinds partition the flat fraction; brightness and contrast match a float64 reference."""
    from typer.testing import CliRunner

    from emdctl.cli import app
    from emdctl.evaluation.stats import pixel_statistics

    g = np.random.default_rng()
    n_black, n_grey, n_white, n_digit = g.integers(1, 20, size=4)
    levels = [g.integers(0, 80, n_black), g.integers(90, 165, n_grey), g.integers(175, 250, n_white)]
    flat = np.concatenate([np.broadcast_to(v[:, None, None, None], (len(v), 16, 16, 1)) for v in levels])
    flat = np.clip(flat + g.integers(-3, 4, flat.shape), 0, 255)  # std ~2 grey levels: still flat
    x, _ = blobs(int(n_digit), seed=int(g.integers(1 << 30)))
    images = np.concatenate([flat, x]).astype(np.uint8)
    s = pixel_statistics(torch.from_numpy(images).permute(0, 3, 1, 2))
    n = len(images)
    assert s["images"] == n
    assert s["flat_black_fraction"] == pytest.approx(n_black / n)
    assert s["flat_grey_fraction"] == pytest.approx(n_grey / n)
    assert s["flat_white_fraction"] == pytest.approx(n_white / n)
    assert s["flat_fraction"] == pytest.approx((n - n_digit) / n)
    ref = images.reshape(n, -1).astype(np.float64)
    assert s["mean_brightness"] == pytest.approx(ref.mean(1).mean(), rel=1e-12)
    assert s["mean_contrast"] == pytest.approx(ref.std(1, ddof=1).mean(), rel=1e-12)

    res = CliRunner().invoke(app, ["evaluate", "stats", str(write_npz(tmp_path / "x.npz", images)),
                                   "--device", "cpu", "--json", str(tmp_path / "s.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())[str(tmp_path / "x.npz")]["flat_fraction"] == pytest.approx(
        s["flat_fraction"]
    )


def test_shift_background_is_invariant_to_an_image_offset_and_keeps_black_backgrounds(shared_data):
    """The quotient a DC-blind teacher is compared in: one image per class of level offsets."""
    from emdctl.evaluation.stats import images_of, shift_background

    x = torch.rand(9, 1, 12, 12, dtype=torch.float64) * 2 - 1
    c = torch.randn(9, 1, 1, 1, dtype=torch.float64) * 10  # fresh offsets as large as the DDPM's
    y = shift_background(x)
    assert torch.allclose(shift_background(x + c), y, atol=1e-12)
    assert torch.equal(y.flatten(1).median(1).values, torch.full((9,), -1.0, dtype=torch.float64))
    assert torch.allclose(y - x, (y - x).flatten(1)[:, :1].view(-1, 1, 1, 1).expand_as(x))  # a pure offset
    mnist = images_of(shared_data / "mnist", 300)
    assert torch.equal(shift_background(mnist), mnist)  # MNIST's median pixel is already black
    u = torch.randint(0, 256, (7, 1, 9, 9), dtype=torch.uint8)
    v = shift_background(u)
    assert v.flatten(1).median(1).values.eq(0).all()
    assert torch.equal(v.int(), (u.int() - u.flatten(1).median(1).values.view(-1, 1, 1, 1).int()).clamp(min=0))


def test_paired_comparison_against_brute_force():
    """Sign test, sign-flip p and paired t against direct enumeration on fresh random differences."""
    import itertools

    from emdctl.evaluation.paired import paired_comparison, sign_flip_p, sign_test_p

    assert sign_test_p(8, 10) == pytest.approx(56 / 1024, rel=1e-15)  # C(10,8)+C(10,9)+C(10,10) = 56
    g = np.random.default_rng()
    n = int(g.integers(6, 12))
    b = g.uniform(0.005, 0.03, n)
    a = b + g.normal(0.004, 0.006, n)
    d = a - b
    flips = np.array(list(itertools.product([1.0, -1.0], repeat=n)))
    brute = float(((flips * d).sum(1) >= d.sum() - 1e-12).mean())
    assert sign_flip_p(list(d)) == pytest.approx(brute, rel=1e-12)
    # Monte Carlo mode estimates the same p (standard error <= 0.5 / sqrt(200k) ~ 0.0011).
    assert sign_flip_p(list(d), exact=False) == pytest.approx(brute, abs=0.006)
    r = paired_comparison(list(a), list(b))
    wins = int((d > 0).sum())
    assert r["b_lower"] == wins and r["sign_test_p"] == pytest.approx(
        sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n
    )
    assert r["mean_difference"] == pytest.approx(d.mean(), rel=1e-12)
    assert r["standard_error"] == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(n)), rel=1e-12)
    assert r["sd_a"] == pytest.approx(a.std(ddof=1), rel=1e-12)
    with pytest.raises(ValueError, match="equal"):
        paired_comparison([0.1, 0.2], [0.1])


def test_mode_metrics_on_constructed_samples():
    """Samples placed by hand: per-mode mass (within 3 scales), TV, off-mode fraction, spread and
    recall are known exactly."""
    from emdctl.evaluation.mixture import within_probability

    mix = GaussianMixture(**preset_mixture("ring8-unequal"))
    g = fresh()
    counts = torch.randint(0, 400, (8,), generator=g)
    counts[3] = 0  # an empty mode: not recalled
    far = int(counts.sum()) // 10  # samples at 6 scales from a mean: off-mode, in no mode's mass
    pts, radii = [], []
    for k, c in enumerate(counts.tolist()):
        r = 0.5 * mix.scales[k] * torch.rand(c, 1, generator=g, dtype=torch.float64)  # within 0.5 scale
        a = 2 * math.pi * torch.rand(c, 1, generator=g, dtype=torch.float64)
        pts.append(mix.means[k] + r * torch.cat([a.cos(), a.sin()], 1))
        radii.append(r[:, 0] / mix.scales[k])
    pts.append(mix.means[0] + 6 * mix.scales[0] * torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(far, 2))
    pts.append(torch.full((5, 2), float("nan"), dtype=torch.float64))
    x = torch.cat(pts)
    n = len(x)
    mass = counts.double() / n
    expected = mix.weights * (1 - math.exp(-4.5))  # P(chi_2 <= 3) = 1 - exp(-9/2)
    assert within_probability(2, 3.0) == pytest.approx(1 - math.exp(-4.5), rel=1e-12)
    m = mode_metrics(x, mix)
    assert m["n"] == n and m["nonfinite_fraction"] == pytest.approx(5 / n)
    assert m["mode_mass"] == pytest.approx(mass.tolist(), abs=1e-5)
    assert m["expected_mass"] == pytest.approx(expected.tolist(), abs=1e-5)
    off = (far + 5) / n  # the far and the non-finite samples are mass of no mode
    assert m["off_mode_fraction"] == pytest.approx(off, abs=1e-12)
    tv = 0.5 * (float((mass - expected).abs().sum()) + abs(off - math.exp(-4.5)))
    assert m["tv_distance"] == pytest.approx(tv, abs=1e-12)
    rms = float(torch.cat(radii).square().mean().div(2).sqrt())  # the far samples are not inliers
    assert m["mode_spread"] == pytest.approx(rms / math.sqrt((1 - 9 * math.exp(-8)) / (1 - math.exp(-8))), rel=1e-9)
    expected_recall = float((mass >= 0.5 * expected).double().mean())
    assert m["mode_recall"] == pytest.approx(expected_recall) and m["mode_recall"] <= 7 / 8
    assert m["modes_covered"] == int((mass >= 0.5 * expected).sum())


@pytest.mark.slow
def test_mode_spread_against_exact_samples_and_shrunk_copies():
    """Exact mixture samples have spread 1 (within 4 standard errors); the same samples pulled
    towards their means by a factor c have spread exactly c times theirs; the closed-form
    E[r^2 | r <= 4] equals the 2-D formula and a Monte Carlo estimate in 5-D."""
    from emdctl.evaluation.mixture import exact_inlier_rms

    g = fresh()
    e = math.exp(-8.0)
    assert exact_inlier_rms(2) == pytest.approx(math.sqrt((1 - 9 * e) / (1 - e)), rel=1e-12)  # (2 - 18e)/(1 - e) / 2
    r2 = torch.randn(400_000, 5, generator=g, dtype=torch.float64).square().sum(1)
    mc = float((r2[r2 <= 16].mean() / 5).sqrt())
    assert exact_inlier_rms(5) == pytest.approx(mc, rel=3e-3)
    mix = GaussianMixture(**preset_mixture("ring8-unequal"))
    n = 200_000
    x = mix.sample(n, g)
    spread = mode_metrics(x, mix)["mode_spread"]
    assert abs(spread - 1) < 4 * 0.5 / math.sqrt(n)  # r^2 ~ chi-square(2): the rms has relative sd 1/(2 sqrt(n))
    # Shrinking towards the assigned mean keeps each sample's component (the log-posterior ratio is
    # linear along the segment) and its inlier status, so on inliers the ratio is exactly c.
    c = 0.3 + 0.6 * float(torch.rand((), generator=g))
    x = x[:20000]
    mu = mix.means[mix.responsibilities(x).argmax(1)]
    x = x[(x - mu).norm(dim=1) <= 4 * mix.scales[0]]
    mu = mix.means[mix.responsibilities(x).argmax(1)]
    ratio = mode_metrics(mu + c * (x - mu), mix)["mode_spread"] / mode_metrics(x, mix)["mode_spread"]
    assert ratio == pytest.approx(c, rel=1e-9)


def test_sliced_wasserstein_against_exact_references():
    """A translated copy: every projection shifts by <c, d>, so SW = sqrt(mean_d <c, d>^2) exactly; a
    permuted copy: SW = 0; and a brute-force per-direction sorted matching on fresh random sets."""
    g = fresh()
    a = torch.randn(3000, 2, generator=g, dtype=torch.float64) * torch.rand(2, generator=g, dtype=torch.float64)
    c = torch.randn(2, generator=g, dtype=torch.float64)
    dirs = torch.randn(2, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    exact = float((c @ dirs).square().mean().sqrt())
    assert sliced_wasserstein(a, a + c) == pytest.approx(exact, rel=1e-9)
    assert sliced_wasserstein(a, a[torch.randperm(len(a), generator=g)]) == pytest.approx(0.0, abs=1e-12)
    b = torch.randn(3000, 2, generator=g, dtype=torch.float64) + c
    brute = np.mean([np.mean((np.sort(a.numpy() @ d) - np.sort(b.numpy() @ d)) ** 2) for d in dirs.T.numpy()])
    assert sliced_wasserstein(a, b) == pytest.approx(float(np.sqrt(brute)), rel=1e-9)


def test_periodic_mode_metrics_match_evaluate_modes(tmp_path):
    """`logging.eval_every` writes mode metrics of the EMA generator into metrics.jsonl at the start,
    at each crossing and at the end; the last equals `emdctl evaluate modes` on the finished run."""
    from rich.console import Console

    from emdctl.commands.distill import run_recipe
    from emdctl.commands.evaluate import modes_and_report
    from emdctl.recipe import parse_recipe

    from .conftest import tiny_mixture_recipe

    data = tiny_mixture_recipe(**{"logging.eval_every": 320, "logging.eval_samples": 3000, "duration": 704})
    run_dir = tmp_path / "run"
    run_recipe(parse_recipe(data, "tiny.yaml"), run_dir=run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "evaluation"]
    assert [r["images"] for r in evals] == [0, 320, 640, 704]
    assert all(r["eval/n"] == 3000 for r in evals)
    assert len({r["eval/tv_distance"] for r in evals}) > 1  # the generator moved
    final = modes_and_report(
        sources=[run_dir], seeds=list(range(3000)), plot=None, json_out=None, console=Console(quiet=True)
    )[str(run_dir)]
    for key in ("tv_distance", "off_mode_fraction", "mode_recall", "sliced_wasserstein"):
        assert evals[-1][f"eval/{key}"] == pytest.approx(final[key], abs=1e-9), key
    assert (run_dir / "curves.png").is_file()


@pytest.mark.parametrize("killed_in", ["evaluate", "save_checkpoint"])
@pytest.mark.slow
def test_a_start_killed_before_its_first_checkpoint_ends_with_the_same_evaluations(tmp_path, monkeypatch, killed_in):
    """Killed in the evaluation at 0 images, or after writing it but before the first checkpoint:
    re-running the same command starts afresh, with no stale or duplicated record, and ends with
    the records of an uninterrupted run."""
    from emdctl.checkpoint import CheckpointManager
    from emdctl.commands.distill import run_recipe
    from emdctl.recipe import parse_recipe
    from emdctl.runs import RunDir
    from emdctl.trainer import Trainer

    from .conftest import tiny_mixture_recipe

    def evaluations(run_dir):
        return [r for r in RunDir(run_dir).read_metrics() if r.get("kind") == "evaluation"]

    data = tiny_mixture_recipe(**{"logging.eval_every": 320, "logging.eval_samples": 2000, "duration": 704})
    run_recipe(parse_recipe(data, "tiny.yaml"), run_dir=tmp_path / "straight")

    class Killed(BaseException):
        pass

    def killed(self, *a, **k):
        written = [r["images"] for r in evaluations(self.run.root)]
        assert written == ([0] if killed_in == "save_checkpoint" else [])  # what the kill leaves behind
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(Trainer, killed_in, killed)
        with pytest.raises(Killed):
            run_recipe(parse_recipe(data, "tiny.yaml"), run_dir=tmp_path / "killed")
    assert not CheckpointManager(tmp_path / "killed").entries()
    run_recipe(parse_recipe(data, "tiny.yaml"), run_dir=tmp_path / "killed")
    straight, resumed = evaluations(tmp_path / "straight"), evaluations(tmp_path / "killed")
    assert [r["images"] for r in resumed] == [0, 320, 640, 704]
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]


def test_periodic_evaluation_needs_a_mixture_teacher(tmp_path):
    """Refused when the recipe is read, before any teacher loads or run directory appears."""
    from emdctl.recipe import parse_recipe

    from .conftest import tiny_mixture_recipe

    data = tiny_mixture_recipe(**{"logging.eval_every": 320})
    data["teacher"] = {"kind": "ddpm-pulfer", "path": str(tmp_path / "teacher.pt")}
    with pytest.raises(UserError, match=r"^tiny.yaml: .*logging.eval_every: .*mixture teachers only"):
        parse_recipe(data, "tiny.yaml")
    data["logging"]["eval_every"] = 0
    parse_recipe(data, "tiny.yaml")  # the same recipe without it is fine
