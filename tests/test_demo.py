"""The demonstration commands run end to end (tiny budgets here; the README records real ones)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from emdctl.commands.demo import demo_loop, demo_mixture, demo_mixture_seeds, parse_methods
from emdctl.errors import UserError
from emdctl.evaluation.classifier import train_feature_net

from .conftest import REPO, tiny_mixture_recipe

QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115


@pytest.mark.slow
def test_demo_mixture(tmp_path):
    summary = demo_mixture(
        out=tmp_path / "demo",
        budget=640,
        preset="ring8-unequal",
        steps=4,
        seed=0,
        console=QUIET,
        base=tiny_mixture_recipe(),
    )
    assert set(summary) == {"emd", "diff-instruct"}
    from emdctl.evaluation.mixture import generator_mode_metrics
    from emdctl.sampling import open_generator
    from emdctl.teachers.mixture import GaussianMixture

    for name, s in summary.items():  # what `emdctl evaluate modes` computes for that run, number for number
        gen, cfg = open_generator(tmp_path / "demo" / name)
        _, m = generator_mode_metrics(gen, GaussianMixture(**cfg["teacher"]["mixture"]), list(range(20000)))
        assert s["tv_distance"] == m["tv_distance"] and s["mode_mass"] == m["mode_mass"]
    assert (tmp_path / "demo" / "modes-side-by-side.png").is_file()
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["K"] == 4


@pytest.mark.slow
def test_demo_mixture_over_seeds_reports_paired_statistics(tmp_path):
    out = tmp_path / "demo"
    kw = dict(budget=640, preset="ring8-unequal", steps=2, seeds=[3, 5], console=QUIET,
              base=tiny_mixture_recipe(), eval_every=320)  # fmt: skip
    res = demo_mixture_seeds(out=out, **kw)
    per_seed = {s: json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (3, 5)}
    assert res["tv_distance"]["emd"] == [per_seed[s]["emd"]["tv_distance"] for s in (3, 5)]
    assert res["tv_distance"]["diff-instruct"] == [per_seed[s]["diff-instruct"]["tv_distance"] for s in (3, 5)]
    # The seed reaches the runs: different seeds, different students.
    assert res["tv_distance"]["emd"][0] != res["tv_distance"]["emd"][1]
    d = [a - b for a, b in zip(res["tv_distance"]["diff-instruct"], res["tv_distance"]["emd"], strict=True)]
    assert res["paired"]["diff-instruct"]["mean_difference"] == pytest.approx(sum(d) / 2)
    assert res["paired"]["diff-instruct"]["b_lower"] == sum(x > 0 for x in d)
    saved = json.loads((out / "paired.json").read_text())
    assert (saved["paired"]["diff-instruct"]["a"], saved["paired"]["diff-instruct"]["b"]) == ("diff-instruct", "emd")
    assert (out / "paired-diff-instruct.png").is_file()
    # Evaluated during training too: at 0, 320 and 640 images; the last point is the final evaluation.
    trace = res["trace"]["points"]["diff-instruct"]
    assert [p["images"] for p in trace] == [0, 320, 640]
    assert trace[-1]["mean_a"] == pytest.approx(sum(res["tv_distance"]["diff-instruct"]) / 2, abs=1e-12)
    assert trace[-1]["mean_b"] == pytest.approx(sum(res["tv_distance"]["emd"]) / 2, abs=1e-12)
    assert trace[0]["mean_difference"] == 0  # both methods start from the same generator
    assert (out / "tv-over-training.png").is_file()
    half = res["trace"]["second_half"]  # each run's mean TV over its evaluations at 320 and 640 images
    for m in ("diff-instruct", "emd"):
        expected = []
        for s in (3, 5):
            records = [json.loads(line) for line in (out / f"seed-{s}" / m / "metrics.jsonl").open()]
            during = [r for r in records if r.get("kind") == "evaluation" and "iteration" in r]  # not evaluate's
            tv = [r["eval/tv_distance"] for r in during if r["images"] in (320, 640)]
            assert len(tv) == 2
            expected.append(sum(tv) / 2)
        assert half["per_seed"][m] == pytest.approx(expected, abs=1e-12)
    assert half["paired"]["diff-instruct"]["mean_a"] == pytest.approx(sum(half["per_seed"]["diff-instruct"]) / 2)
    # Re-running the same command resumes: the finished runs are not trained again.
    again = demo_mixture_seeds(out=out, **kw)
    assert again["tv_distance"] == res["tv_distance"]
    # Seeds in parallel worker processes (one thread each) give the same students, bit for bit.
    par = tmp_path / "parallel"
    jobs = demo_mixture_seeds(out=par, jobs=2, **kw)
    assert jobs["tv_distance"] == res["tv_distance"]
    assert json.dumps(jobs["trace"]) == json.dumps(res["trace"])  # (as text: it holds NaN t values)
    for s in (3, 5):
        assert "scatter plots" in (par / f"seed-{s}" / "demo.log").read_text()
        for m in ("emd", "diff-instruct"):
            a = load_file(str(out / f"seed-{s}" / m / "generator" / "model.safetensors"))
            b = load_file(str(par / f"seed-{s}" / m / "generator" / "model.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_demo_mixture_compares_any_methods_with_emd(tmp_path):
    """--methods: every method on the same budget and seeds, each paired with EMD, one table of
    every mode metric; methods with a recipe of their own run at their papers' settings."""
    out = tmp_path / "demo"
    res = demo_mixture_seeds(out=out, budget=320, preset="ring8-unequal", steps=2, seeds=[0, 1], console=QUIET,
                             base=tiny_mixture_recipe(), methods=["sid", "emd", "dmd2"])  # fmt: skip
    assert res["reference"] == "emd" and set(res["paired"]) == {"sid", "dmd2"}
    for m in ("sid", "dmd2"):
        d = [a - b for a, b in zip(res["tv_distance"][m], res["tv_distance"]["emd"], strict=True)]
        assert res["paired"][m]["mean_difference"] == pytest.approx(sum(d) / 2)
        assert (out / f"paired-{m}.png").is_file()
    assert res["metrics"]["sid"]["tv_distance"] == res["tv_distance"]["sid"]
    resolved = yaml.safe_load((out / "seed-0" / "dmd2" / "recipe.yaml").read_text())
    assert resolved["fake_score"]["steps_per_iteration"] == 5 and resolved["method"]["gan"] is True
    resolved = yaml.safe_load((out / "seed-0" / "sid" / "recipe.yaml").read_text())
    assert resolved["method"]["alpha"] == 1.2 and resolved["fake_score"]["noise_levels"]["dist"] == "lognormal"
    with pytest.raises(UserError, match="--methods"):
        parse_methods("emd,sd")
    with pytest.raises(UserError, match="named twice"):
        parse_methods("emd,sid,emd")


def test_demo_mixture_cli_refuses_seed_and_seeds_together():
    from typer.testing import CliRunner

    from emdctl.cli import app

    res = CliRunner().invoke(app, ["demo", "mixture", "--seed", "2", "--seeds", "0-3"])
    assert res.exit_code != 0 and "not both" in res.output
    res = CliRunner().invoke(app, ["demo", "mixture", "--seeds", "4-1"])
    assert res.exit_code != 0 and "--seeds" in res.output
    res = CliRunner().invoke(app, ["demo", "mixture", "--jobs", "2"])
    assert res.exit_code != 0 and "give --seeds too" in res.output


def test_demo_mixture_set_reaches_both_runs_and_bad_fields_stop_before_any_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import emdctl.commands.demo as demo_module
    from emdctl.cli import app

    seen = []
    monkeypatch.setattr(demo_module, "demo_mixture", lambda **k: seen.append(k))
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "mixture", "--out", str(out), "--set", "fake_score.steps_per_iteration=5"])
    assert res.exit_code == 0, res.output
    call = seen[0]
    assert (call["budget"], call["preset"], call["steps"], call["seed"]) == (1_000_000, "ring8-unequal", 8, 0)
    base = call["base"]
    assert base["fake_score"]["steps_per_iteration"] == 5
    assert base["optim"] == demo_module.read_yaml(demo_module.DEFAULT_RECIPE_PATH)["optim"]  # the rest untouched
    # fields that depend on the duration are checked against --budget, not the default recipe's 200k
    decay = ["--set", "optim.decay.start=500k"]
    res = CliRunner().invoke(app, ["demo", "mixture", "--out", str(out), "--budget", "1M", *decay])
    assert res.exit_code == 0, res.output
    assert seen[-1]["base"]["optim"]["decay"] == {"start": "500k"}
    res = CliRunner().invoke(app, ["demo", "mixture", "--out", str(out), "--budget", "400k", *decay])
    assert res.exit_code != 0 and "optim.decay.start (500,000 images) must come before" in res.output
    seen.pop()
    # and the base reaches each method's recipe
    runs = demo_module._variants(base, 640, 8)
    assert all(r["fake_score"]["steps_per_iteration"] == 5 for r in runs.values())

    for item, message in [
        ("method.langevin.steps=3", "sets method.langevin.steps itself; use --k"),
        ("seed=4", "sets seed itself; use --seed or --seeds"),
        ("fake_score.steps_per_iteration=0", "fake_score.steps_per_iteration: input should be greater than 0"),
        ("fake_score.nope=1", "fake_score.nope: unknown field"),
    ]:
        res = CliRunner().invoke(app, ["demo", "mixture", "--out", str(out), "--set", item])
        assert res.exit_code != 0 and message in res.output, (item, res.output)
    assert len(seen) == 1 and not out.exists()


@pytest.mark.slow
def test_demo_loop_on_the_mnist_teacher(tmp_path, shared_data):
    features = tmp_path / "f.safetensors"
    train_feature_net(shared_data / "mnist", features, epochs=1, max_images=1500, log=lambda m: None)
    # The shipped recipe names the teacher relative to the repository root; a checkout elsewhere (CI
    # clones into a temporary folder) points it at wherever the shared data was found.
    recipe = yaml.safe_load((REPO / "recipes" / "mnist.yaml").read_text())
    recipe["teacher"]["path"] = str(shared_data / "teachers" / "ddpm_mnist_pulfer_myunet.pt")
    (tmp_path / "mnist.yaml").write_text(yaml.safe_dump(recipe))
    results = demo_loop(out=tmp_path / "loop", distill_recipe=tmp_path / "mnist.yaml", data=shared_data / "mnist",
                        budget=64, n=64, teacher_steps=10, features=features, device="cpu", console=QUIET,
                        shift_background=True, methods=["emd", "diff-instruct", "dmd2"])  # fmt: skip
    assert set(results) == {"teacher (10 steps)", "initial generator (1 step)", "EMD (1 step)",
                            "Diff-Instruct (1 step)", "DMD2 (1 step)", "real data"}  # fmt: skip
    dmd2 = yaml.safe_load((tmp_path / "loop" / "dmd2" / "recipe.yaml").read_text())
    assert dmd2["method"]["data"]["path"] == str((shared_data / "mnist").resolve())  # its GAN's real images
    teacher = results["teacher (10 steps)"]
    assert teacher["FD_classifier to teacher"] < 1e-6 and teacher["shifted: FD_classifier to teacher"] < 1e-6
    assert all(0 <= r["flat_fraction"] <= 1 for r in results.values())
    # The teacher cannot see its samples' level: most clip to flat squares, which the shift undoes.
    assert teacher["flat_fraction"] > 0.5 and teacher["shifted: flat_fraction"] < 0.1
    real = results["real data"]
    assert real["shifted: mean_brightness"] == pytest.approx(real["mean_brightness"])  # black already
    assert (tmp_path / "loop" / "grids-side-by-side.png").is_file()
    assert (tmp_path / "loop" / "grids-side-by-side-shifted.png").is_file()


def test_demo_loop_checks_its_teacher_before_training_the_feature_space(tmp_path, shared_data):
    recipe = yaml.safe_load((REPO / "recipes" / "mnist-own-teacher.yaml").read_text())
    recipe["teacher"]["path"] = str(tmp_path / "no-teacher-here")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="no-teacher-here: no such model directory"):
        demo_loop(out=tmp_path / "loop", distill_recipe=tmp_path / "r.yaml", data=shared_data / "mnist", budget=64, n=8,
                  teacher_steps=2, device="cpu", console=QUIET)  # fmt: skip
    assert not (tmp_path / "loop" / "features.safetensors").exists()


def test_demo_mnist_trains_the_recipes_duration_unless_told(monkeypatch):
    from typer.testing import CliRunner

    import emdctl.commands.demo as demo_module
    from emdctl.cli import app

    seen = []
    monkeypatch.setattr(demo_module, "demo_loop", lambda **k: seen.append(k["budget"]))
    for args, budget in (([], None), (["--budget", "16k"], 16_000)):
        res = CliRunner().invoke(app, ["demo", "mnist", *args])
        assert res.exit_code == 0, res.output
        assert seen[-1] == budget
