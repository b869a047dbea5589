"""EDM teacher training: runs on the shared trainer, resumes exactly, feeds distillation."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from emdctl.checkpoint import CheckpointManager
from emdctl.commands.distill import run_recipe
from emdctl.data import EpochPermutations
from emdctl.recipe import parse_recipe


@pytest.fixture(scope="module")
def edm_zip(tmp_path_factory):
    """A dataset zip in NVlabs/edm's layout: 00000/img00000000.png ... + dataset.json labels."""
    path = tmp_path_factory.mktemp("data") / "tiny-16x16.zip"
    g = np.random.default_rng(0)
    labels = []
    with zipfile.ZipFile(path, "w") as z:
        for i in range(120):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            arr = g.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
            from io import BytesIO

            buf = BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
            labels.append([name, int(i % 3)])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def teacher_recipe(data, duration=96, **kw):
    r = {
        "kind": "teacher-train",
        "name": "t",
        "device": "cpu",
        "data": {"path": str(data), "labels": True, "xflip": True},
        "network": {
            "arch": "ddpmpp",
            "kwargs": {
                "model_channels": 16,
                "channel_mult": [1, 2],
                "num_blocks": 1,
                "attn_resolutions": [8],
                "dropout": 0.0,
            },
        },
        "optim": {"warmup": 64},
        "batch": {"size": 16},
        "duration": duration,
        "logging": {"every": 32, "grid_every": 0, "grid_size": 4, "progress": False},
        "checkpoint": {"every": 1000, "keep": 2},
    }
    r.update(kw)
    return parse_recipe(r, "teacher.yaml")


def test_epoch_permutations_visit_every_image_once_per_epoch():
    order = EpochPermutations(37, seed=5)
    first = [order(g) for g in range(37)]
    second = [order(g) for g in range(37, 74)]
    assert sorted(first) == list(range(37)) and sorted(second) == list(range(37)) and first != second


@pytest.mark.slow
def test_train_resume_and_distill_from_the_trained_teacher(edm_zip, tmp_path):
    run, summary = run_recipe(teacher_recipe(edm_zip), run_dir=tmp_path / "full")
    assert summary["images"] == 96 and (tmp_path / "full" / "teacher" / "config.json").is_file()
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss/net"]) for r in records)
    # interrupted at 48 images, then extended with --resume: bit-for-bit the uninterrupted run
    run_recipe(teacher_recipe(edm_zip, duration=48), run_dir=tmp_path / "split")
    run_recipe(teacher_recipe(edm_zip), run_dir=tmp_path / "split", resume=True)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the trained teacher is an emdctl model directory: distill it for one iteration
    distill = parse_recipe(
        {
            "kind": "distill",
            "name": "d",
            "device": "cpu",
            "teacher": {"kind": "pretrained", "path": str(tmp_path / "full" / "teacher"), "resolution": 16},
            "method": {"name": "emd", "langevin": {"steps": 2}},
            "batch": {"size": 4},
            "duration": 8,
            "logging": {"every": 4, "grid_every": 8, "grid_size": 4, "progress": False},
        },
        "d.yaml",
    )
    _, s = run_recipe(distill, run_dir=tmp_path / "distill")
    assert s["images"] == 8 and (tmp_path / "distill" / "generator" / "model.safetensors").is_file()


def test_labels_requested_but_absent(tmp_path):
    from emdctl.errors import UserError

    np.savez(tmp_path / "x.npz", arr_0=np.zeros((10, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="no labels"):
        run_recipe(teacher_recipe(tmp_path / "x.npz"), run_dir=tmp_path / "r")
