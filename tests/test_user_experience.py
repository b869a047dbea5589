"""What a new user meets first: threads on shared cores, progress, sample folders that evaluate,
evaluations that refuse or warn instead of misleading, strict mode metrics, sources found for them,
one-line errors, defaults that are the schema's, and the small things (issue: "What a new user hits")."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from emdctl.cli import app
from emdctl.errors import UserError

from .conftest import REPO, fresh, make_generator, tiny_mixture_recipe

runner = CliRunner()


def invoke(args, cwd=None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def distill_tiny(tmp_path, name="run", **overrides):
    from emdctl.commands.distill import run_recipe
    from emdctl.recipe import parse_recipe

    recipe = parse_recipe(tiny_mixture_recipe(name=name, **overrides), "test")
    run, _ = run_recipe(recipe, run_dir=tmp_path / "runs" / name, console=Console(file=io.StringIO()))
    return run.root


# -- 1. threads ---------------------------------------------------------------------------------------


def test_auto_threads_is_one_for_a_mixture_and_restored_after(tmp_path, monkeypatch):
    from emdctl.trainer import Trainer

    seen = []
    original = Trainer.run_training

    def spy(self):
        seen.append(torch.get_num_threads())
        return original(self)

    monkeypatch.setattr(Trainer, "run_training", spy)
    torch.set_num_threads(2)
    distill_tiny(tmp_path)
    assert seen == [1] and torch.get_num_threads() == 2
    distill_tiny(tmp_path, name="two", threads=2)
    assert seen == [1, 2]


def test_thread_count_changes_no_result(tmp_path):
    from safetensors.torch import load_file

    a = distill_tiny(tmp_path, name="one", threads=1)
    b = distill_tiny(tmp_path, name="two", threads=2)
    ta = load_file(a / "generator" / "model.safetensors")
    tb = load_file(b / "generator" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_threads_option_is_checked_and_not_part_of_the_recipe_identity(tmp_path):
    r = invoke(["distill", "--threads", "zero"], cwd=tmp_path)
    assert r.exit_code == 2 and "--threads 'zero'" in r.stderr
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(tiny_mixture_recipe()))
    assert invoke(["distill", f, "--run-dir", tmp_path / "run", "--threads", "1"]).exit_code == 0
    r = invoke(["distill", f, "--run-dir", tmp_path / "run", "--threads", "2"])  # same run: nothing to do
    assert r.exit_code == 0 and "already trained" in r.stderr


@pytest.mark.slow
def test_bench_shared_cpu_rows(tmp_path):
    from emdctl.bench import run_shared_cpu

    rows = run_shared_cpu(images=512, log=lambda m: None, repeats=1)
    assert len(rows) == 3
    for row in rows.values():
        assert row["baseline"] > 0 and row["configured"] > 0
        assert row["ratio"] == pytest.approx(row["configured"] / row["baseline"])


# -- 2. progress and the teacher-fit cache ------------------------------------------------------------


def test_mixture_fit_is_cached_and_identical(monkeypatch):
    import emdctl.teachers as teachers
    from emdctl.teachers.mixture import GaussianMixture, preset_mixture

    mix = GaussianMixture(**preset_mixture("ring8"))
    cfg = teachers._mlp_student_config(mix, type("N", (), {"hidden": 16, "layers": 2, "emb_dim": 8})())
    first = teachers.fit_mixture_network(mix, cfg, 20, 64, 1e-3, 5, "cpu")

    def refit(*a, **k):
        raise AssertionError("fitted again instead of loading the cache")

    monkeypatch.setattr(teachers, "_fit_mixture_network", refit)
    again = teachers.fit_mixture_network(mix, cfg, 20, 64, 1e-3, 5, "cpu")
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="fitted again"):  # another seed is another key
        teachers.fit_mixture_network(mix, cfg, 20, 64, 1e-3, 6, "cpu")


def test_progress_in_a_log_is_plain_lines_with_a_rate():
    from emdctl.progress import Progress, RateColumn, rich_bar

    buf = io.StringIO()
    console = Console(file=buf, width=200)
    with Progress(300, "features", "img", console=console, every_s=0.0) as p:
        for _ in range(3):
            p.advance(100)
    text = buf.getvalue()
    assert "\r" not in text and text.count("\n") == 5
    assert "features: started (0 of 300 img)" in text and re.search(r"features: done, 300/300 img, [\d,.]+ img/s", text)
    assert any(isinstance(c, RateColumn) for c in rich_bar(console).columns)  # the training bar shows a rate


def test_reference_pass_and_train_features_show_progress(tmp_path, capsys):
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", arr_0=g.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), arr_1=g.integers(0, 2, 40))
    from emdctl.evaluation.classifier import train_feature_net

    train_feature_net(tmp_path / "d.npz", tmp_path / "f.safetensors", epochs=1, batch=8, log=lambda m: None)
    assert "train-features epoch 1/1: done" in capsys.readouterr().err
    r = invoke(["evaluate", "ref", tmp_path / "d.npz", "--out", tmp_path / "ref.safetensors",
                "--features", f"classifier:{tmp_path / 'f.safetensors'}"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert re.search(r"reference \(emdctl-classifier\): done, 40/40 img, [\d,.]+ img/s", r.stderr)


# -- 3. sample folders evaluate; folders of mixed sizes are refused -----------------------------------


def test_a_sample_folder_reads_back_without_its_preview(tmp_path):
    from emdctl.data import open_dataset

    gen = make_generator(tmp_path / "g", shape=(3, 8, 8), attn=())
    r = invoke(["sample", gen, "--n", 5, "--out", tmp_path / "s", "--device", "cpu"])
    assert r.exit_code == 0 and "preview: " in r.stdout
    assert (tmp_path / "s" / ".preview" / "grid.png").is_file()
    ds = open_dataset(tmp_path / "s")
    assert len(ds) == 5 and tuple(ds.shape()) == (3, 8, 8)
    Image.new("RGB", (20, 20)).save(tmp_path / "s" / "grid.png")  # what older versions left there
    with pytest.raises(UserError, match=r"images of different sizes .*move the odd files out"):
        open_dataset(tmp_path / "s")


# -- 4. evaluations that would mislead --------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    from emdctl.evaluation.classifier import train_feature_net

    root = tmp_path_factory.mktemp("feat")
    g = np.random.default_rng(1)
    np.savez(root / "gray.npz", arr_0=g.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8), arr_1=g.integers(0, 2, 60))
    np.savez(root / "rgb.npz", arr_0=g.integers(0, 255, (60, 8, 8, 3), dtype=np.uint8))
    train_feature_net(root / "gray.npz", root / "f.safetensors", epochs=1, batch=16, log=lambda m: None)
    return root


def test_evaluation_refuses_images_of_another_kind(feature_file):
    from emdctl.commands.evaluate import evaluate_command
    from emdctl.evaluation.fidelity import FeatureSpace, Reference, check_sides

    feats = f"classifier:{feature_file / 'f.safetensors'}"
    with pytest.raises(UserError, match=r"3x8x8 .* trained on 1x8x8"):
        evaluate_command(
            metrics=["fid"],
            source=feature_file / "rgb.npz",
            ref=feature_file / "gray.npz",
            features=feats,
            n=60,
            seed_ranges=None,
            batch=16,
            device="cpu",
        )
    any_size = FeatureSpace(None, "x", "f", "l", "id", "FD", False)  # Inception-like: resizes any input
    ref = Reference(None, None, None, {"img_shape": [1, 8, 8]})
    with pytest.raises(UserError, match=r"reference .*gray.npz holds 1x8x8"):
        check_sides(any_size, (3, 8, 8), "rgb.npz", ref, feature_file / "gray.npz")
    check_sides(any_size, (1, 8, 8), "gray2.npz", ref, feature_file / "gray.npz")


def test_small_sets_warn_and_is_refuses_too_few(feature_file):
    from emdctl.commands.evaluate import evaluate_command

    feats = f"classifier:{feature_file / 'f.safetensors'}"
    lines = []
    res = evaluate_command(
        metrics=["fid", "kid"],
        source=feature_file / "gray.npz",
        ref=feature_file / "gray.npz",
        features=feats,
        n=8,
        seed_ranges=None,
        batch=4,
        device="cpu",
        log=lines.append,
        ref_n=8,
    )
    assert res["reference_images"] == 8 and "reference: 8 of the 60 images of" in " ".join(lines)
    assert any("FD from 8 samples and 8 reference images" in w for w in res["warnings"])
    assert any("KID from subsets of 8" in w for w in res["warnings"])
    res = evaluate_command(
        metrics=["fid"],
        source=feature_file / "gray.npz",
        ref=feature_file / "gray.npz",
        features=feats,
        n=8,
        seed_ranges=None,
        batch=4,
        device="cpu",
        log=lines.append,
    )
    assert res["reference_images"] == 60 and any("reference: 60 of the 60 images of" in m for m in lines[-3:])
    with pytest.raises(UserError, match="at least 10 images"):
        evaluate_command(
            metrics=["isc"],
            source=feature_file / "gray.npz",
            ref=None,
            features=feats,
            n=8,
            seed_ranges=None,
            batch=4,
            device="cpu",
            log=lambda m: None,
        )


def test_train_features_warns_when_accuracy_is_low(tmp_path):
    g = np.random.default_rng(0)  # random labels: nothing to learn
    np.savez(tmp_path / "d.npz", arr_0=g.integers(0, 255, (80, 8, 8, 1), dtype=np.uint8), arr_1=g.integers(0, 4, 80))
    r = invoke(["evaluate", "train-features", "--data", tmp_path / "d.npz", "--out", tmp_path / "f.safetensors",
                "--epochs", 1, "--batch", 16, "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0 and "warning: held-out accuracy" in r.stderr


# -- 5. strict mode metrics ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mode_mass_counts_only_samples_within_three_scales():
    from emdctl.evaluation.mixture import mode_metrics, within_probability
    from emdctl.teachers.mixture import GaussianMixture, preset_mixture

    mix = GaussianMixture(**preset_mixture("ring8-unequal"))
    g = fresh()
    exact = mix.sample(100_000, g)
    m = mode_metrics(exact, mix)
    c = within_probability(2, 3.0)
    assert c == pytest.approx(1 - np.exp(-4.5), abs=1e-12)  # chi with 2 degrees of freedom
    assert m["mode_recall"] == 1 and m["tv_distance"] < 0.01 and abs(m["off_mode_fraction"] - (1 - c)) < 0.003
    # Half of mode 0's samples moved onto the bridge towards mode 1, at 6 scales from mode 0: a
    # nearest-mode count still gives mode 0 its mass; the strict one gives it to no mode.
    x = exact.clone()
    k = mix.responsibilities(x).argmax(1)
    idx = torch.nonzero(k == 0).flatten()[::2]
    direction = (mix.means[1] - mix.means[0]) / (mix.means[1] - mix.means[0]).norm()
    was_within = ((x[idx] - mix.means[0]).norm(dim=1) <= 3 * mix.scales[0]).sum()
    x[idx] = mix.means[0] + 6 * mix.scales[0] * direction
    moved = float(was_within) / len(x)
    s = mode_metrics(x, mix)
    assert s["mode_mass"][0] == pytest.approx(m["mode_mass"][0] - moved, abs=2e-4)
    assert s["off_mode_fraction"] == pytest.approx(m["off_mode_fraction"] + moved, abs=2e-4)
    assert s["tv_distance"] > m["tv_distance"] + 0.9 * moved
    # a mode with less than half its expected mass is not recalled
    x = exact.clone()
    idx = torch.nonzero(k == 7).flatten()
    x[idx[: int(0.6 * len(idx))]] = mix.means[0]
    assert mode_metrics(x, mix)["mode_recall"] == 7 / 8


def test_modes_plot_refuses_a_missing_folder_and_says_what_it_wrote(tmp_path):
    run = distill_tiny(tmp_path)
    r = invoke(["evaluate", "modes", run, "--n", 500, "--plot", tmp_path / "nowhere" / "m.png"])
    assert r.exit_code == 2 and "does not exist" in r.stderr and not (tmp_path / "nowhere").exists()
    r = invoke(["evaluate", "modes", run, "--n", 500, "--plot", tmp_path / "m.png", "--json", tmp_path / "m.json"])
    assert r.exit_code == 0 and f"wrote {tmp_path / 'm.png'}" in r.stdout and f"wrote {tmp_path / 'm.json'}" in r.stdout
    with Image.open(tmp_path / "m.png") as im:
        assert im.size[1] > im.size[0]  # the legend below the axes
    assert json.loads((tmp_path / "m.json").read_text())[str(run)]["within_scales"] == 3.0


# -- 6. sources found for the user; exports that sample and evaluate ------------------------------------


def test_sample_and_evaluate_without_a_source_use_the_newest_finished_run(tmp_path):
    distill_tiny(tmp_path, name="old")
    newest = distill_tiny(tmp_path, name="new")
    r = invoke(["sample", "--n", 4, "--out", tmp_path / "s"], cwd=tmp_path)
    assert r.exit_code == 0 and "sampling the newest finished run: runs/new" in r.stderr
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["generator"] == "runs/new"
    r = invoke(["sample", "--n", 4, "--out", tmp_path / "t"], cwd=tmp_path / "runs")
    assert r.exit_code == 2 and "no finished run under runs/" in r.stderr
    assert newest.is_dir()


def test_evaluate_uses_the_reference_the_recipe_names(tmp_path, feature_file):
    from emdctl.commands.evaluate import evaluate_command

    gen = make_generator(tmp_path / "run" / "generator", shape=(1, 8, 8), attn=())
    (tmp_path / "run" / "checkpoints").mkdir()
    feats = f"classifier:{feature_file / 'f.safetensors'}"
    recipe = {"evaluation": {"reference": str(feature_file / "gray.npz"), "features": feats}}
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    lines = []
    kw = dict(metrics=["fid"], source=gen, ref=None, n=20, seed_ranges=None, batch=10, device="cpu", log=lines.append)
    res = evaluate_command(features=None, **kw)
    assert res["reference"] == str(feature_file / "gray.npz") and res["features_ident"].startswith("classifier-")
    assert any("evaluation.reference" in m for m in lines)
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({}))
    with pytest.raises(UserError, match="a reference is required .* evaluation.reference"):
        evaluate_command(features=feats, **kw)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.slow
def test_exports_sample_and_evaluate_like_the_safetensors_export(tmp_path, fmt):
    from emdctl.evaluation.stats import images_of

    gen = make_generator(tmp_path / "g", shape=(3, 8, 8), label_dim=2, attn=())
    assert invoke(["export", gen, "--format", fmt, "--out", tmp_path / "e"]).exit_code == 0
    for src, out in ((gen, "a"), (tmp_path / "e", "b")):
        r = invoke(["sample", src, "--seeds", "3-9", "--out", tmp_path / out, "--format", "npz", "--device", "cpu"])
        assert r.exit_code == 0, r.output
    a = np.load(tmp_path / "a" / "samples.npz")
    b = np.load(tmp_path / "b" / "samples.npz")
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1 and np.array_equal(a["arr_1"], b["arr_1"])
    assert torch.equal(
        images_of(tmp_path / "e", 7, seeds=list(range(3, 10))), torch.from_numpy(b["arr_0"]).permute(0, 3, 1, 2)
    )
    r = invoke(["sample", tmp_path / "e", "--n", 2, "--steps", 3, "--out", tmp_path / "c"])
    assert r.exit_code == 2 and "trained 1 step(s) only" in r.stderr
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / cfg["file"]).write_bytes((tmp_path / "e" / cfg["file"]).read_bytes() + b"x")
    r = invoke(["sample", tmp_path / "e", "--n", 2, "--out", tmp_path / "d"])
    assert r.exit_code == 2 and "does not match config.json's file_sha256" in r.stderr


def test_version_and_the_download_error_names_the_recipe_field(tmp_path, monkeypatch):
    from emdctl import __version__
    from emdctl.hub import fetch

    r = invoke(["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"emdctl {__version__}"
    with pytest.raises(UserError, match=r"or set teacher\.path \(instead of teacher\.url\) to a local copy"):
        from emdctl.recipe import parse_recipe
        from emdctl.teachers import load_teacher

        spec = parse_recipe({"teacher": {"kind": "edm-pickle", "url": "https://example.org/x.pkl"},
                             "method": {"name": "emd"}}, "t").teacher  # fmt: skip
        load_teacher(spec)
    with pytest.raises(UserError, match="or set method.discriminator.feature_weights to a local copy"):
        fetch("https://example.org/w.pth", None, "weights", local="method.discriminator.feature_weights")


# -- 7. one-line errors, arguments checked before torch ----------------------------------------------


def test_paths_and_counts_give_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        (["sample", "--n", 0], "--n 0: give at least 1 image"),
        (["sample", "--n", 10, "--seeds", "100-109"], "give --n 10 (seeds 0..9) or --seeds 100-109, not both"),
        (["sample", "--n", 2, "--out", tmp_path / "file"], "exists and is not a directory"),
        (["distill", "--run-dir", "/proc/emdctl-test/x", "--set", "duration=512"], "/proc/emdctl-test"),
        (["evaluate", "stats", tmp_path, "--json", tmp_path / "no" / "s.json"], "does not exist"),
    ]
    for args, message in cases:
        r = invoke(args, cwd=tmp_path)
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.output)
        assert "Traceback" not in r.output


def test_arguments_are_checked_before_torch_is_imported():
    code = (
        "import sys\nfrom emdctl.cli import app\n"
        "bad = (['sample', '--n', '0'], ['sample', '--n', '3', '--seeds', '1-3'], ['distill', '--threads', 'x'])\n"
        "for args in bad:\n"
        "    try:\n        app(args)\n    except SystemExit as e:\n        assert e.code == 2, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# -- 8. defaults come from the schema, and the README states them ------------------------------------


def _resolved(**method):
    from emdctl.recipe import parse_recipe, recipe_to_dict

    data = {"teacher": {"kind": "mixture", "preset": "ring8"}, "method": {"name": "emd", **method}}
    return recipe_to_dict(parse_recipe(data, "test"))


def test_prior_pull_is_off_and_the_fake_score_follows_the_methods_noise_levels():
    r = _resolved()
    assert r["method"]["langevin"]["prior_pull"] is False
    assert r["fake_score"]["noise_levels"] == r["method"]["noise_levels"]
    own = {"dist": "loguniform", "sigma_min": 0.05, "sigma_max": 5.0}
    assert _resolved(noise_levels=own)["fake_score"]["noise_levels"]["sigma_max"] == 5.0


def test_the_readme_states_the_schemas_defaults():
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- defaults -->") : text.index("<!-- /defaults -->")]
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]+)` \|", table, re.M)
    assert len(rows) >= 10
    resolved = _resolved()
    for field, stated in rows:
        node = resolved
        for part in field.split("."):
            node = node[part]
        assert node == yaml.safe_load(stated) or node == stated, (field, stated, node)
    # inline statements of the Langevin options in the docs: "`name` (default on|off|**off**|value)"
    langevin = resolved["method"]["langevin"]
    docs = "".join((REPO / "docs" / f).read_text() for f in ("algorithm.md", "cli.md"))
    stated_inline = re.findall(r"`([a-z_]+)`(?::[^()]*)? \(default \**(on|off|[\w.]+)\**", text + docs)
    assert len([n for n, _ in stated_inline if n in langevin]) >= 3
    for name, stated in stated_inline:
        if name in langevin:
            want = {"on": True, "off": False}.get(stated, stated)
            assert langevin[name] == want or str(langevin[name]) == stated, (name, stated)


# -- 9. the small things ----------------------------------------------------------------------------


def test_help_texts():
    assert "sample" not in invoke(["teacher", "--help"]).stdout.split("Commands")[1]
    assert "--ref" not in invoke(["evaluate", "isc", "--help"]).stdout
    fid = invoke(["evaluate", "fid", "--help"]).stdout
    assert "required unless the run's recipe names evaluation.reference" in " ".join(fid.split())
    assert (
        "KEY=VALUE" in invoke(["distill", "--help"]).stdout and "list[str]" not in invoke(["distill", "--help"]).stdout
    )


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = distill_tiny(tmp_path)
    finally:
        os.umask(old)
    for p in [run / "recipe.yaml", run / "generator", run / "generator" / "model.safetensors", run / "curves.png"]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_constant_series_are_flat_with_distinct_ticks(tmp_path):
    from emdctl.plots import _labelled, _ticks, _value_range

    lo, hi = _value_range([0.3, 0.3 + 1e-15, 0.3])
    assert lo < 0.3 < hi and hi - lo > 0.1
    labels = [label for _, label in _labelled(_ticks(1.0, 1.0 + 1e-6))]
    assert len(set(labels)) == len(labels) > 1


def test_wide_tables_are_not_cut_in_logs():
    res = subprocess.run(
        [sys.executable, "-c", "from emdctl.cli import out; from rich.table import Table\n"
         "t = Table(); [t.add_column('c' * 30) for _ in range(5)]; t.add_row(*['v' * 30] * 5); out.print(t)"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.count("v" * 30) == 5
