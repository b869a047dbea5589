"""Export: portable generators that load without the recipe or the teacher and match torch."""

from __future__ import annotations

import json

import pytest
import torch

from emdctl.commands.export import export_command
from emdctl.errors import UserError
from emdctl.export import PortableGenerator
from emdctl.generator import load_generator

from .conftest import make_generator


@pytest.fixture(scope="module")
def cond_generator(tmp_path_factory):
    return make_generator(tmp_path_factory.mktemp("g") / "generator", "adm", label_dim=4)


def test_safetensors_export_is_self_contained(cond_generator, tmp_path):
    export_command(source=cond_generator, fmt="safetensors", out=tmp_path / "exp")
    gen, cfg = load_generator(tmp_path / "exp")
    assert cfg["img_shape"] == [3, 16, 16] and cfg["label_dim"] == 4 and cfg["sigma_star"] == 2.5
    assert cfg["data"]["range"] == [-1.0, 1.0] and cfg["denoiser"]["arch"] == "dhariwalunet"


@pytest.mark.slow
def test_onnx_export_of_a_conditional_generator_matches_torch(cond_generator, tmp_path):
    pytest.importorskip("onnxruntime")
    res = export_command(source=cond_generator, fmt="onnx", out=tmp_path / "onnx")
    assert res["verified"]["max_abs_diff"] <= 1 and res["verified"]["mean_abs_diff"] < 0.01
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["z_size"] == 768 and cfg["num_classes"] == 4 and cfg["output"].startswith("uint8")


def test_torchscript_export_matches_torch(cond_generator, tmp_path):
    res = export_command(source=cond_generator, fmt="torchscript", out=tmp_path / "ts")
    scripted = torch.jit.load(res["path"])
    gen, _ = load_generator(cond_generator)
    portable = PortableGenerator(gen, True).eval()
    z, y = torch.randn(5, 768), torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        assert torch.equal(scripted(z, y), portable(z, y))


def test_bad_export_requests(cond_generator, tmp_path):
    with pytest.raises(UserError, match="export format"):
        export_command(source=cond_generator, fmt="tflite", out=tmp_path / "x")
    with pytest.raises(UserError, match="no such run"):
        export_command(source=tmp_path / "missing", fmt="onnx", out=tmp_path / "x")
