"""The recipe schema: valid recipes load with every default; bad ones give one clear line each."""

from __future__ import annotations

import pytest
import yaml

from emdctl.errors import UserError
from emdctl.recipe import (
    DEFAULT_RECIPE_PATH,
    DistillRecipe,
    TeacherTrainRecipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
)

from .conftest import REPO, tiny_mixture_recipe


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def error_of(tmp_path, data, overrides=None) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, data), overrides or [])
    return e.value.message


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    r = load_recipe(path)
    assert r.name
    # A dumped recipe is itself a valid recipe that resolves to the same thing.
    again = parse_recipe(yaml.safe_load(dump_recipe(r)), "dump")
    assert again == r


def test_embedded_default_matches_recipes_default():
    assert DEFAULT_RECIPE_PATH.read_text() == (REPO / "recipes" / "default.yaml").read_text()
    r = load_recipe(None)
    assert isinstance(r, DistillRecipe) and r.method.name == "emd" and r.teacher.kind == "mixture"


def test_defaults_are_filled_in(tmp_path):
    r = load_recipe(write(tmp_path, {"teacher": {"kind": "mixture", "preset": "ring8"}, "method": {"name": "emd"}}))
    assert r.method.langevin.steps == 8 and r.optim.betas_gen == (0.0, 0.99)
    assert r.name == "r"  # from the file name
    shown = yaml.safe_load(dump_recipe(r))
    assert shown["checkpoint"]["keep"] == 3 and shown["ema"]["halflife"] == 500_000


def test_image_counts(tmp_path):
    r = load_recipe(write(tmp_path, tiny_mixture_recipe(duration="1.5M", **{"logging.every": "10k"})))
    assert r.duration == 1_500_000 and r.logging.every == 10_000
    msg = error_of(tmp_path, tiny_mixture_recipe(duration="ten"))
    assert "duration" in msg and "image count" in msg


def test_unknown_field_names_file_path_and_allowed(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"optim.lrr": 1e-3}))
    assert msg.count("\n") == 0
    assert "r.yaml" in msg and "optim.lrr" in msg and "unknown field" in msg and "lr_gen" in msg


def test_unknown_top_level_field(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(colour="blue"))
    assert "colour: unknown field in top level" in msg and "teacher" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"batch.size": "big"}))
    assert "batch.size" in msg and "'big'" in msg


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml: no such recipe file" in e.value.message


def test_negative_step_size(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.langevin.gamma_eps": -0.1}))
    assert "method.langevin.gamma_eps" in msg and "greater than or equal to 0" in msg and "-0.1" in msg


def test_negative_K(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.langevin.steps": -1}))
    assert "method.langevin.steps" in msg


def test_unknown_method(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.name": "magic"}))
    assert "method" in msg and "'magic'" in msg and "emd" in msg and "diff-instruct" in msg


def test_unknown_teacher_kind(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"teacher.kind": "stable-diffusion"}))
    assert "teacher" in msg and "'stable-diffusion'" in msg and "ddpm-pulfer" in msg


def test_literal_values_are_listed(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.weighting": "weird"}))
    assert "method.weighting" in msg and "'sigma2'" in msg


def test_field_inside_a_method_is_checked(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.langevin.stepz": 3}))
    assert "method.langevin.stepz" in msg and "allowed: steps, gamma_eps" in msg


def test_malformed_yaml(tmp_path):
    msg = error_of(tmp_path, "teacher: [unclosed\n  kind: x")
    assert "malformed YAML" in msg and "line" in msg


def test_empty_and_non_mapping(tmp_path):
    assert "empty" in error_of(tmp_path, "")
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")


def test_mixture_consistency(tmp_path):
    data = tiny_mixture_recipe()
    data["teacher"] = {"kind": "mixture", "mixture": {"weights": [1, 1], "means": [[0, 0]], "scales": [1, 1]}}
    assert "one entry per component" in error_of(tmp_path, data)
    data["teacher"] = {"kind": "mixture"}
    assert "exactly one of 'preset' or 'mixture'" in error_of(tmp_path, data)


def test_sigma_init_or_lambda_init(tmp_path):
    r = load_recipe(write(tmp_path, tiny_mixture_recipe(generator={"lambda_init": -6.0})))
    assert abs(r.generator.sigma_star - 20.0855) < 1e-3  # lambda = -2 ln sigma
    msg = error_of(tmp_path, tiny_mixture_recipe(generator={"lambda_init": 0.0, "sigma_init": 1.0}))
    assert "exactly one of sigma_init or lambda_init" in msg


def test_noise_level_bounds(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"method.noise_levels": {"sigma_min": 5, "sigma_max": 1}}))
    assert "sigma_min" in msg and "below sigma_max" in msg


def test_decay_must_start_before_the_end(tmp_path):
    msg = error_of(tmp_path, tiny_mixture_recipe(**{"optim.decay": {"start": 640}}))
    assert msg.count("\n") == 0 and "optim.decay.start" in msg and "before the end of the duration" in msg
    assert "final" in error_of(tmp_path, tiny_mixture_recipe(**{"optim.decay": {"start": 0, "final": 0}}))


def test_cuda_graphs_need_the_whole_e_step_compiled(tmp_path):
    graphs = {"precision.cuda_graphs": True, "precision.compile": True}
    msg = error_of(tmp_path, tiny_mixture_recipe(**graphs))  # fused_update defaults to on
    assert msg.count("\n") == 0 and "precision.cuda_graphs" in msg and "fused_update: off" in msg
    off = {**graphs, "method.langevin.fused_update": "off"}
    assert "precision.compile: true" in error_of(tmp_path, tiny_mixture_recipe(**{**off, "precision.compile": False}))
    assert "gamma_z: 0" in error_of(tmp_path, tiny_mixture_recipe(**{**off, "method.langevin.gamma_z": 0.1}))
    assert load_recipe(write(tmp_path, tiny_mixture_recipe(**off))).precision.cuda_graphs
    di = tiny_mixture_recipe(**graphs, method={"name": "diff-instruct"})
    assert "remove it for this method" in error_of(tmp_path, di)


def test_micro_batch_must_divide(tmp_path):
    assert "must divide" in error_of(tmp_path, tiny_mixture_recipe(batch={"size": 64, "micro": 10}))


def test_overrides_are_validated_like_the_file(tmp_path):
    p = write(tmp_path, tiny_mixture_recipe())
    r = load_recipe(p, ["optim.lr_gen=2e-6", "method.langevin.steps=3", "method.langevin.cancel_noise=false"])
    assert r.optim.lr_gen == 2e-6 and r.method.langevin.steps == 3 and r.method.langevin.cancel_noise is False
    with pytest.raises(UserError) as e:
        load_recipe(p, ["method.langevin.steps=-2"])
    assert "--set method.langevin.steps=-2" in e.value.message and "method.langevin.steps" in e.value.message
    with pytest.raises(UserError) as e:
        load_recipe(p, ["nonsense"])
    assert "KEY=VALUE" in e.value.message
    with pytest.raises(UserError):
        apply_overrides({"a": 1}, ["a.b=2"], "x")


def test_teacher_train_kind(tmp_path):
    r = load_recipe(write(tmp_path, {"kind": "teacher-train", "data": {"path": "d.zip"}}))
    assert isinstance(r, TeacherTrainRecipe) and r.network.arch == "ddpmpp"
    assert "unknown value 'teach'" in error_of(tmp_path, {"kind": "teach"})
