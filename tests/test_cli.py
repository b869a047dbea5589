"""The command line: complete --help, clean one-line errors (exit 2), and the main jobs end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from emdctl.cli import app

from .conftest import tiny_mixture_recipe

runner = CliRunner()

COMMANDS = [
    [],
    ["distill"],
    ["sample"],
    ["export"],
    ["recipe"],
    ["recipe", "validate"],
    ["recipe", "show"],
    ["teacher"],
    ["teacher", "convert"],
    ["teacher", "train"],
    ["evaluate"],
    ["evaluate", "fid"],
    ["evaluate", "kid"],
    ["evaluate", "isc"],
    ["evaluate", "prc"],
    ["evaluate", "all"],
    ["evaluate", "ref"],
    ["evaluate", "train-features"],
    ["evaluate", "modes"],
    ["bench"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def invoke(args):
    res = runner.invoke(app, args)
    assert "Traceback" not in res.output, res.output
    return res


def write_recipe(tmp_path, data):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_recipe_validate_and_show(tmp_path):
    p = write_recipe(tmp_path, tiny_mixture_recipe())
    res = invoke(["recipe", "validate", str(p)])
    assert res.exit_code == 0 and "ok" in res.stdout
    res = invoke(["recipe", "show", str(p), "--set", "optim.lr_gen=2e-6"])
    shown = yaml.safe_load(res.stdout)
    assert shown["optim"]["lr_gen"] == 2e-6 and shown["optim"]["lr_fake"] == 1e-3
    assert shown["fake_score"]["steps_per_iteration"] == 1  # every default is printed


@pytest.mark.parametrize(
    "mutation, expect",
    [
        ({"optim.lrr": 1}, "optim.lrr: unknown field"),
        ({"batch.size": "x"}, "batch.size"),
        ({"method.langevin.gamma_eps": -1}, "method.langevin.gamma_eps"),
        ({"method.name": "nope"}, "'nope'"),
    ],
)
def test_bad_recipe_exit_2_one_line(tmp_path, mutation, expect):
    p = write_recipe(tmp_path, tiny_mixture_recipe(**mutation))
    for cmd in (["recipe", "validate", str(p)], ["distill", str(p), "--runs-root", str(tmp_path / "runs")]):
        res = invoke(cmd)
        assert res.exit_code == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]


def test_missing_recipe_file(tmp_path):
    res = invoke(["distill", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "no such recipe file" in res.stderr


def test_bad_override(tmp_path):
    p = write_recipe(tmp_path, tiny_mixture_recipe())
    res = invoke(["distill", str(p), "--set", "method.langevin.steps=-3"])
    assert res.exit_code == 2 and "method.langevin.steps" in res.stderr


def test_distill_sample_export_evaluate_end_to_end(tmp_path):
    p = write_recipe(tmp_path, tiny_mixture_recipe())
    runs = tmp_path / "runs"
    res = invoke(["distill", str(p), "--runs-root", str(runs)])
    assert res.exit_code == 0, res.output
    run = runs / "tiny"
    assert (run / "recipe.yaml").is_file() and (run / "generator" / "config.json").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["images"] == 640 and "loss/gen" in records[-1]
    assert list((run / "grids").glob("*.png")) and (run / "curves.png").is_file()
    # Re-running the same command finds the finished run and does nothing more.
    res = invoke(["distill", str(p), "--runs-root", str(runs)])
    assert res.exit_code == 0 and "nothing to do" in res.stderr
    # A different recipe for the same run directory is refused, naming the difference.
    p2 = write_recipe(tmp_path, tiny_mixture_recipe(**{"optim.lr_gen": 5e-4}))
    res = invoke(["distill", str(p2), "--runs-root", str(runs)])
    assert res.exit_code == 2 and "optim.lr_gen" in res.stderr and "--resume" in res.stderr

    res = invoke(["sample", str(run), "--n", "50", "--format", "npz", "--out", str(tmp_path / "s"), "--batch", "7"])
    assert res.exit_code == 0, res.output
    import numpy as np

    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (50, 2)

    res = invoke(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0 and (tmp_path / "exp" / "model.safetensors").is_file()

    res = invoke(["evaluate", "modes", str(run), "--n", "2000", "--plot", str(tmp_path / "modes.png")])
    assert res.exit_code == 0, res.output
    assert "tv_distance" in res.stdout and (tmp_path / "modes.png").is_file()

    # An export (EMA or raw weights, from the run's generator/ or its checkpoints) keeps the teacher's
    # description, so the exported model is evaluated against the same mixture as the run.
    run_teacher = json.loads((run / "generator" / "config.json").read_text())["teacher"]
    res = invoke(["export", str(run), "--format", "safetensors", "--no-ema", "--out", str(tmp_path / "raw")])
    assert res.exit_code == 0, res.output
    for exported in ("exp", "raw"):
        cfg = json.loads((tmp_path / exported / "config.json").read_text())
        assert cfg["teacher"]["mixture"] == run_teacher["mixture"], exported
        res = invoke(
            ["evaluate", "modes", str(tmp_path / exported), "--n", "500", "--json", str(tmp_path / f"{exported}.json")]
        )
        assert res.exit_code == 0 and "tv_distance" in res.stdout, res.output
    # `evaluate modes RUN --no-ema` is the raw generator: the same numbers as its export, recorded as such.
    res = invoke(["evaluate", "modes", str(run), "--n", "500", "--no-ema", "--json", str(tmp_path / "run-raw.json")])
    assert res.exit_code == 0, res.output
    by_run = json.loads((tmp_path / "run-raw.json").read_text())[str(run)]
    by_export = json.loads((tmp_path / "raw.json").read_text())[str(tmp_path / "raw")]
    assert by_run == by_export and by_run != json.loads((tmp_path / "exp.json").read_text())[str(tmp_path / "exp")]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "evaluation" and records[-1]["ema"] is False
    assert all(r["ema"] is True for r in records[:-1] if r.get("kind") == "evaluation")


def test_sample_argument_errors(tmp_path):
    res = invoke(["sample", str(tmp_path / "nothing"), "--n", "4"])
    assert res.exit_code == 2 and "no such run" in res.stderr
    res = invoke(["sample", str(tmp_path), "--seeds", "5-1"])
    assert res.exit_code == 2 and "--seeds" in res.stderr
    res = invoke(["sample", str(tmp_path)])
    assert res.exit_code == 2 and "--n" in res.stderr
