"""The text-conditioned teacher of the CPU quality loop (`kind: teacher-train-text`) and the prompt
adherence metric."""

from __future__ import annotations

import json

import pytest
import torch

from emdctl.checkpoint import CheckpointManager
from emdctl.errors import UserError
from emdctl.recipe import parse_recipe

from .conftest import fresh

pytest.importorskip("diffusers")


def text_recipe(shared_data, **over) -> dict:
    r = {"kind": "teacher-train-text", "name": "tt", "seed": 3, "device": "cpu",
         "data": {"path": str(shared_data / "mnist"), "labels": True, "max_images": 64},
         "text_encoder": {"hidden": 16, "layers": 1, "heads": 2, "max_tokens": 16},
         "unet": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 4},
         "optim": {"lr": 2e-3, "warmup": 0}, "batch": {"size": 16}, "duration": 64, "ema": {"halflife": 100},
         "logging": {"every": 32, "grid_every": 64, "grid_size": 10, "progress": False},
         "checkpoint": {"every": 32, "keep": 2}}  # fmt: skip
    r.update(over)
    return r


def build(shared_data, **over):
    from emdctl.distributed import DistContext
    from emdctl.methods import build_method

    return build_method(parse_recipe(text_recipe(shared_data, **over), "r"), DistContext())


def test_captions_are_the_class_phrasings_or_the_empty_prompt(shared_data):
    m = build(shared_data, prompt_dropout=0.3, batch={"size": 64})
    it = int(torch.randint(0, 1000, (1,), generator=fresh()))
    draws = m.draws(it)
    y = torch.randint(0, 10, (64,), generator=fresh())
    idx = m.captions(draws, y, slice(0, 64))
    empty = len(m.prompt_list)
    assert 5 <= int((idx == empty).sum()) <= 35  # dropout 0.3 of 64 (binomial, far tails)
    for c, i in zip(y.tolist(), idx.tolist(), strict=True):
        assert i == empty or m.prompt_list[i] in m.prompts_by_class[c]
    assert torch.equal(m.captions(m.draws(it), y, slice(0, 64)), idx)  # a function of (seed, iteration)
    assert torch.equal(m.table[empty], m.table[-1])


def test_the_loss_on_a_fixed_batch_decreases(shared_data):
    """Fixed images, captions, timesteps and noise: the epsilon loss before and after 12 steps."""
    m = build(shared_data, optim={"lr": 3e-3, "warmup": 0})
    g = fresh()
    x0 = torch.stack([m.dataset[i][0] for i in range(16)]).float()
    x0 = x0 / 127.5 - 1 if x0.max() > 1.5 else x0
    y = torch.as_tensor([int(m.dataset.labels[i]) for i in range(16)])
    labels = m.table[m.phrasing[y, 0]]
    grid = m.net.grid
    sigma = grid[torch.randint(0, len(grid), (16,), generator=g)].float()
    noise = torch.randn(x0.shape, generator=g)

    def loss():
        with torch.no_grad():
            d = m.net(x0 + sigma[:, None, None, None] * noise, sigma, labels)
            return float((m.net.dsm_weight(sigma) * (d - x0).square().flatten(1).sum(1)).mean())

    before = loss()
    for it in range(12):
        m.train_step(it)
    assert loss() < 0.7 * before


@pytest.mark.slow
def test_resumes_bit_for_bit_and_exports_a_pipeline_emdctl_distills(shared_data, tmp_path):
    from diffusers import DiffusionPipeline
    from rich.console import Console

    from emdctl.commands.distill import run_recipe
    from emdctl.teachers import load_teacher

    quiet = Console(quiet=True)
    run_recipe(parse_recipe(text_recipe(shared_data), "r"), run_dir=tmp_path / "full", console=quiet)
    run_recipe(parse_recipe(text_recipe(shared_data, duration=32), "r"), run_dir=tmp_path / "split", console=quiet)
    run_recipe(parse_recipe(text_recipe(shared_data), "r"), run_dir=tmp_path / "split", resume=True, console=quiet)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe_dir = tmp_path / "full" / "teacher"
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, vae=None)  # pixel space: no VAE to load
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.in_channels == 1
    by_class = json.loads((pipe_dir / "prompts.json").read_text())
    assert (
        by_class["7"][0] == "a handwritten digit seven"
        and len((pipe_dir / "prompts.txt").read_text().split("\n")) == 41
    )
    spec = parse_recipe({"kind": "distill", "name": "d", "teacher": {"kind": "diffusers", "path": str(pipe_dir),
                         "guidance": {"scale": 2.0}}, "method": {"name": "emd"}}, "d").teacher  # fmt: skip
    teacher = load_teacher(spec, prompts=pipe_dir / "prompts.txt")
    # The exported UNet is the run's EMA network: same denoiser output.
    state, _ = CheckpointManager(tmp_path / "full").load()
    ema = {k[len("net.net_ema.") :]: v for k, v in state.items() if k.startswith("net.net_ema.")}
    assert all(torch.equal(v, ema[k]) for k, v in teacher.denoiser.base.state_dict().items())
    assert teacher.conditions.count == 40 and teacher.img_shape == (1, 28, 28)


def test_bad_text_recipes(shared_data):
    with pytest.raises(UserError, match="data.labels"):
        parse_recipe(text_recipe(shared_data, data={"path": str(shared_data / "mnist"), "labels": False}), "r")
    with pytest.raises(UserError, match="multiple of norm_num_groups"):
        parse_recipe(text_recipe(shared_data, unet={"block_out_channels": [6, 16], "norm_num_groups": 4,
                                                      "down_block_types": ["DownBlock2D"] * 2,
                                                      "up_block_types": ["UpBlock2D"] * 2}), "r")  # fmt: skip
    with pytest.raises(UserError, match="prompts: no phrasing for class"):
        build(shared_data, prompts={0: ["zero"]})


def test_prompt_adherence_of_perfect_and_shuffled_sets(shared_data, tmp_path):
    """Real MNIST test images prompted with their own class's phrasing score the classifier's
    accuracy; prompted with the next class's, about nothing; and the number is the share of
    predictions equal to the prompted class, computed here independently."""
    import numpy as np

    from emdctl.data import open_dataset
    from emdctl.evaluation.adherence import adherence, prompt_classes
    from emdctl.evaluation.classifier import _prepare, load_feature_net, train_feature_net
    from emdctl.methods.text_teacher_training import MNIST_PROMPTS

    features = tmp_path / "f.safetensors"
    info = train_feature_net(
        shared_data / "mnist", features, epochs=2, max_images=6000, batch=128, lr=3e-3, log=lambda m: None
    )
    net, meta = load_feature_net(features)
    (tmp_path / "p.json").write_text(json.dumps({str(k): v for k, v in MNIST_PROMPTS.items()}))
    classes = prompt_classes(tmp_path / "p.json")
    ds = open_dataset(shared_data / "mnist", use_labels=True)
    pick = torch.randint(len(ds) - 5000, len(ds), (400,), generator=fresh()).tolist()
    images = torch.from_numpy(np.stack([ds.image(i) for i in pick]))
    y = [int(ds.labels[i]) for i in pick]
    g = fresh()
    own = [MNIST_PROMPTS[c][int(torch.randint(0, 4, (1,), generator=g))] for c in y]
    other = [MNIST_PROMPTS[(c + 1) % 10][0] for c in y]
    perfect = adherence(images, own, classes, net, meta)
    shuffled = adherence(images, other, classes, net, meta)
    with torch.no_grad():
        x = images[..., None] if images.ndim == 3 else images
        pred = net(_prepare(x.permute(0, 3, 1, 2), meta["channels"], meta["resolution"]))[1].argmax(1)
    assert perfect["adherence"] == pytest.approx(float((pred == torch.tensor(y)).double().mean()))
    assert perfect["adherence"] > min(0.8, info["held_out_accuracy"] - 0.08) and shuffled["adherence"] < 0.1
    with pytest.raises(UserError, match="not in the teacher's prompts"):
        adherence(images[:2], ["a cat", "a dog"], classes, net, meta)


@pytest.mark.slow
def test_text_loop_end_to_end_on_a_tiny_budget(shared_data, tmp_path):
    """Train a tiny text teacher, then the whole loop at two guidance scales, two methods, two seeds:
    every model has every quantity, per seed; the teacher's samples at w are the FD reference."""
    import yaml

    from emdctl.commands.demo_text import demo_text_loop
    from emdctl.evaluation.classifier import train_feature_net

    teacher_recipe = tmp_path / "teacher.yaml"
    teacher_recipe.write_text(yaml.safe_dump(text_recipe(shared_data)))
    distill = tmp_path / "distill.yaml"
    distill.write_text(yaml.safe_dump({
        "kind": "distill", "name": "d", "device": "cpu", "teacher": {"kind": "diffusers", "path": "unused"},
        "generator": {"sigma_init": 2.5}, "method": {"name": "emd", "langevin": {"steps": 2}},
        "batch": {"size": 8}, "duration": 16, "logging": {"every": 8, "grid_every": 16, "grid_size": 10},
        "checkpoint": {"every": 16}}))  # fmt: skip
    features = tmp_path / "f.safetensors"
    train_feature_net(shared_data / "mnist", features, epochs=1, max_images=1000, log=lambda m: None)
    results = demo_text_loop(distill, shared_data / "mnist", tmp_path / "loop", guidance=(1.0, 2.0),
                             seeds=(0, 1), budget=16, n=80, teacher_steps=2, teacher_train=teacher_recipe,
                             features=features, device="cpu")  # fmt: skip
    assert set(results) == {"1", "2"}
    for w, per_w in results.items():
        assert list(per_w) == ["teacher (2 steps)", "initial generator (1 step)", "EMD (1 step)",
                               "Diff-Instruct (1 step)"]  # fmt: skip
        for label, res in per_w.items():
            assert 0 <= res["adherence"] <= 1 and res["FD to real"] > 0
            assert len(res["adherence per seed"]) == (2 if "(1 step)" in label and "initial" not in label else 1)
        assert per_w["teacher (2 steps)"]["FD to teacher"] == pytest.approx(0, abs=1e-6)
        assert (tmp_path / "loop" / f"w{w}" / "grids.png").is_file()
    # the teacher is guided as asked: w 1 and w 2 give other samples from the same seeds
    assert results["1"]["teacher (2 steps)"]["FD to real"] != results["2"]["teacher (2 steps)"]["FD to real"]
    summary = json.loads((tmp_path / "loop" / "summary.json").read_text())
    assert summary["guidance"] == [1.0, 2.0] and summary["seeds"] == [0, 1]
    assert all(summary["teacher_split_half_fd"][w] > 0 for w in ("1", "2"))  # two halves of samples differ


def test_split_half_fd_against_a_constructed_shift():
    """Halves are alternate rounds through P prompts; the second half = the first + c: equal
    covariances, so the FD is exactly |c|^2."""
    from types import SimpleNamespace

    from emdctl.commands.demo_text import _split_half_fd

    space = SimpleNamespace(distance_layer="f", ident="test")
    prompts = 7
    x = torch.randn(30, prompts, 6, dtype=torch.float64)  # 30 rounds of 7 prompts
    c = torch.randn(6, dtype=torch.float64)
    rounds = torch.stack([x, x + c], 1).reshape(60 * prompts, 6)  # rounds alternate: x, x + c, x, ...
    assert _split_half_fd({"f": rounds}, space, prompts) == pytest.approx(float(c @ c), rel=1e-6, abs=1e-8)
    assert _split_half_fd({"f": rounds[: 2 * prompts - 1]}, space, prompts) is None  # under two rounds: no split


def test_text_loop_refuses_methods_that_need_captioned_images_up_front(tmp_path):
    """GDD, SiDA and DMD2 need real images with captions: refused before any teacher is trained."""
    from emdctl.commands.demo_text import demo_text_loop

    with pytest.raises(UserError, match="--methods: gdd, dmd2 train against real images"):
        demo_text_loop(tmp_path / "absent.yaml", tmp_path, tmp_path / "loop", methods=("emd", "gdd", "dmd2"))
    assert not (tmp_path / "loop").exists()
