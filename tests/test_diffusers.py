"""diffusers teachers: the EDM-form wrappers against diffusers' own schedulers, guidance, prompt
sets, every method with and without LoRA, resume, sample -> export -> DiffusionPipeline. All on
tiny random pipelines the tests build and save (tests/tiny_pipelines.py); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emdctl.checkpoint import CheckpointManager
from emdctl.errors import UserError
from emdctl.recipe import parse_recipe

from .conftest import fresh
from .tiny_pipelines import PROMPTS, build_sd, build_sd3, build_sdxl, recipe, write_prompts

pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "eps": build_sd(root / "sd-eps"),
        "v": build_sd(root / "sd-v", prediction_type="v_prediction", seed=1, scheduler="ddpm"),
        "pixel": build_sd(root / "sd-pixel", seed=2, latent=False),
        "prompts": write_prompts(root / "prompts.txt"),
    }


def teacher_of(pipe, prompts, cache=None, **spec):
    from emdctl.teachers import load_teacher

    r = parse_recipe(recipe(pipe, prompts, teacher=spec), "t")
    return load_teacher(r.teacher, prompts=prompts, prompt_cache=cache, warn=lambda _: None)


def run(r: dict, run_dir, resume=False):
    from rich.console import Console

    from emdctl.commands.distill import run_recipe

    return run_recipe(parse_recipe(r, "r"), run_dir=run_dir, resume=resume, console=Console(quiet=True))


# -- the wrappers against diffusers' own arithmetic ------------------------------------------------
@pytest.mark.parametrize("kind", ["eps", "v", "pixel"])
def test_unet_denoiser_gives_the_schedulers_own_x0_at_every_timestep(sd, kind):
    """D(x_t / sqrt(ab_t); sigma_t) = DDPMScheduler.step(...).pred_original_sample, for the same
    network output, at fresh random timesteps, latents and prompts (epsilon and v prediction)."""
    from diffusers import DDPMScheduler

    teacher = teacher_of(sd[kind], sd["prompts"])
    den, net = teacher.denoiser, teacher.denoiser.network
    cfg = json.loads((sd[kind] / "scheduler" / "scheduler_config.json").read_text())
    sched = DDPMScheduler.from_config(cfg, clip_sample=False, thresholding=False)
    g = fresh()
    ts = torch.randint(0, 1000, (6,), generator=g)
    x_t = torch.randn(6, *den.img_shape, generator=g)
    labels = teacher.conditions(torch.randint(0, len(PROMPTS), (6,), generator=g))
    ab = sched.alphas_cumprod[ts].double()
    sigma = ((1 - ab) / ab).sqrt().float()
    got = den(x_t / ab.sqrt().float().reshape(-1, 1, 1, 1), sigma, labels)
    with torch.no_grad():
        out = net(x_t, ts, labels)
    for i, t in enumerate(ts.tolist()):
        want = sched.step(out[i : i + 1], t, x_t[i : i + 1]).pred_original_sample
        assert torch.allclose(got[i : i + 1], want, atol=2e-5, rtol=1e-4), (kind, t)


def test_flow_denoiser_gives_the_flow_x0(tmp_path):
    """SD3-class flow transformer: D(x_t / (1 - t); t / (1 - t)) = x_t - t v(x_t, 1000 t), the
    x0 of FlowMatchEulerDiscreteScheduler's step to sigma 0, at fresh random t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_sd3(tmp_path / "sd3")
    teacher = teacher_of(pipe, write_prompts(tmp_path / "p.txt"))
    den = teacher.denoiser
    g = fresh()
    t = torch.rand(4, generator=g) * 0.98 + 0.01
    x_t = torch.randn(4, *den.img_shape, generator=g)
    labels = teacher.conditions(torch.randint(0, len(PROMPTS), (4,), generator=g))
    got = den(x_t / (1 - t).reshape(-1, 1, 1, 1), t / (1 - t), labels)
    with torch.no_grad():
        v = den.network(x_t, t * 1000, labels)
    sched = FlowMatchEulerDiscreteScheduler()
    for i in range(4):
        sched.sigmas = torch.tensor([float(t[i]), 0.0])
        sched.timesteps = torch.tensor([float(t[i]) * 1000])
        sched._step_index = 0
        want = sched.step(v[i : i + 1], sched.timesteps[0], x_t[i : i + 1]).prev_sample
        assert torch.allclose(got[i : i + 1], want, atol=2e-5, rtol=1e-4)


def test_guidance_is_one_batched_call_equal_to_two_separate_ones(sd):
    teacher = teacher_of(sd["eps"], sd["prompts"], guidance={"scale": 4.5, "interval": [0.5, 5.0]})
    den, base = teacher.denoiser, teacher.denoiser.base
    g = fresh()
    sigma = den.round_sigma(torch.tensor([0.2, 1.0, 3.0, 10.0]))
    x = torch.randn(4, *den.img_shape, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = teacher.conditions(torch.randint(0, len(PROMPTS), (4,), generator=g))
    calls = []
    base.network.register_forward_hook(lambda _m, a, _o: calls.append(a[0].shape[0]))
    got = den(x, sigma, labels)
    assert calls == [8]  # one call of 2B rows
    d_c = base(x, sigma, labels)
    d_u = base(x, sigma, teacher.conditions.uncond.expand(4, -1))
    w = torch.tensor([1.0, 4.5, 4.5, 1.0]).reshape(-1, 1, 1, 1)  # outside the interval: D_c alone
    assert torch.allclose(got, d_u + w * (d_c - d_u), atol=1e-5)
    assert not torch.allclose(got[1], d_c[1], atol=1e-3)


def test_guidance_needs_a_scale_of_at_least_zero(sd):
    with pytest.raises(UserError, match="teacher.guidance.scale"):
        parse_recipe(recipe(sd["eps"], sd["prompts"], teacher={"guidance": {"scale": -1}}), "r")


# -- prompt sets -----------------------------------------------------------------------------------
def test_prompt_embeddings_are_the_pipelines_and_are_cached(sd, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from emdctl.teachers import diffusers_pipeline

    cache = tmp_path / "prompts.safetensors"
    teacher = teacher_of(sd["eps"], sd["prompts"], cache)
    pipe = DiffusionPipeline.from_pretrained(sd["eps"])
    with torch.no_grad():
        want, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    c = teacher.conditions
    assert c.count == len(PROMPTS) and torch.equal(c(torch.arange(4)), want.flatten(1))
    assert torch.equal(c.uncond, neg[0].flatten())
    assert cache.is_file()

    def refuse(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(diffusers_pipeline, "encode_prompts", refuse)
    again = teacher_of(sd["eps"], sd["prompts"], cache)
    assert torch.equal(again.conditions.table, c.table)
    other = write_prompts(tmp_path / "other.txt", ["a blue circle"])
    with pytest.raises(AssertionError, match="encoded again"):  # another prompt file: not the cache's
        teacher_of(sd["eps"], other, cache)


def test_prompt_files(tmp_path):
    from emdctl.conditioning import read_prompts

    (tmp_path / "a.jsonl").write_text('{"prompt": "x y"}\n\n{"prompt": "z"}\n')
    assert read_prompts(tmp_path / "a.jsonl") == ["x y", "z"]
    (tmp_path / "b.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="b.txt holds no prompts"):
        read_prompts(tmp_path / "b.txt")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="line 1: needs a string field 'prompt'"):
        read_prompts(tmp_path / "c.jsonl")


def test_long_prompts_are_counted_in_a_warning(sd, tmp_path):
    from emdctl.teachers import load_teacher

    said = []
    r = parse_recipe(recipe(sd["eps"], sd["prompts"]), "t")
    load_teacher(r.teacher, prompts=sd["prompts"], warn=said.append)
    # Two of PROMPTS exceed the tiny tokenizer's 12 tokens (one per letter).
    assert len(said) == 1 and "2 of 4 prompts are longer than the tokenizer's 12 tokens" in said[0]


# -- bad input -------------------------------------------------------------------------------------
def test_bad_pipelines_and_recipes_are_one_line(sd, tmp_path, monkeypatch):
    import shutil

    p = sd["prompts"]
    bad = tmp_path / "no-unet"
    shutil.copytree(sd["eps"], bad)
    index = json.loads((bad / "model_index.json").read_text())
    index.pop("unet")
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="has no unet or transformer"):
        teacher_of(bad, p)
    sched = tmp_path / "sched"
    shutil.copytree(sd["eps"], sched)
    cfg = json.loads((sched / "scheduler" / "scheduler_config.json").read_text())
    (sched / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "_class_name": "ScoreSdeVeScheduler"})
    )
    with pytest.raises(UserError, match="scheduler ScoreSdeVeScheduler is not supported"):
        teacher_of(sched, p)
    (sched / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(UserError, match="prediction_type 'flow' is not supported"):
        teacher_of(sched, p)
    pickled = tmp_path / "pickled"
    shutil.copytree(sd["eps"], pickled)
    st = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({}, pickled / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(UserError, match="cannot load the unet"):  # never unpickled
        teacher_of(pickled, p)
    with pytest.raises(UserError, match="data.prompts: this teacher is text-conditioned"):
        teacher_of(sd["eps"], None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe(sd["eps"], p)
    r["teacher"] = {"kind": "diffusers", "model_id": "nobody/no-such-pipeline-here"}
    with pytest.raises(UserError, match="teacher.model_id: cannot fetch 'nobody/no-such-pipeline-here'"):
        run(r, tmp_path / "offline")
    r = {**recipe(sd["eps"], p), "teacher": {"kind": "mixture", "preset": "ring8"}}
    with pytest.raises(UserError, match="data.prompts: prompt sets are for diffusers teachers"):
        parse_recipe(r, "r")


# -- distillation ----------------------------------------------------------------------------------
LORA = {
    "generator": {"sigma_init": 14.6, "lora": {"rank": 4, "alpha": 8}},
    "fake_score": {"lora": {"rank": 4, "alpha": 4}},
}


@pytest.fixture(scope="module")
def captioned(sd, tmp_path_factory):
    """A folder of 16x16 RGB images with a captions JSONL (the teacher's own samples: what `emdctl
    sample --teacher ... --prompts` writes is such a dataset)."""
    import yaml

    from emdctl.commands.sample import sample_command

    root = tmp_path_factory.mktemp("captioned")
    f = root / "r.yaml"
    f.write_text(yaml.safe_dump(recipe(sd["eps"], sd["prompts"])))
    sample_command(source=None, teacher_recipe=f, seeds=list(range(8)), out_dir=root / "images", batch=8, steps=2,
                   fmt="png", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                   show_progress=False, prompts_file=sd["prompts"])  # fmt: skip
    return {"path": str(root / "images"), "captions": str(root / "images" / "index.jsonl")}


REAL_DATA = {"gdd", "sida", "dmd2"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["emd", "diff-instruct", "moment-matching", "sid", "gdd", "sida", "dmd2"])
@pytest.mark.parametrize("lora", [False, True])
def test_every_method_distills_a_guided_text_teacher(sd, captioned, tmp_path, method, lora):
    extra = {"teacher": {"guidance": {"scale": 3.0}}, **(LORA if lora else {})}
    if method == "gdd":  # (GDD's second network is its discriminator, not a denoiser)
        extra.pop("fake_score", None)
    r = recipe(sd["eps"], sd["prompts"], method, **extra)
    if method in REAL_DATA:
        r["method"]["data"] = captioned
    r, summary = run(r, tmp_path / "run")
    assert summary["images"] == 16 and summary["nan_skipped"] == 0
    state, _ = CheckpointManager(tmp_path / "run").load()
    teacher = teacher_of(sd["eps"], sd["prompts"]).init_weights()
    gen = {k[len("net.generator.denoiser.") :]: v for k, v in state.items() if k.startswith("net.generator.denoiser.")}
    moved = [k for k, v in gen.items() if k in teacher and not torch.equal(v, teacher[k])]
    if lora:  # checkpoints hold the adapters alone; the exported base is the teacher's, untrained
        assert gen and all(".lora_" in k for k in gen)
        assert any(v.abs().sum() > 0 for k, v in gen.items() if ".lora_B." in k)
        from safetensors.torch import load_file

        gen = {
            k[len("denoiser.") :]: v for k, v in load_file(tmp_path / "run" / "generator" / "model.safetensors").items()
        }
        base = {k.replace(".base_layer.", "."): v for k, v in gen.items() if ".lora_" not in k}
        assert base.keys() == teacher.keys() and all(torch.equal(v, teacher[k]) for k, v in base.items())
    else:
        assert moved
    assert (tmp_path / "run" / "grids" / "grid-000000000016.png").is_file()  # decoded by the VAE
    cfg = json.loads((tmp_path / "run" / "generator" / "config.json").read_text())
    assert cfg["data"]["kind"] == "latent" and cfg["teacher"]["guidance"]["scale"] == 3.0


def test_lora_students_share_the_teachers_frozen_base(sd):
    """Generator, its EMA and the fake score hold the teacher's own base tensors (one copy of the
    network in memory); only the adapters are trained, and they start at the teacher's function."""
    from emdctl.distributed import DistContext
    from emdctl.memory import parameter_bytes
    from emdctl.methods import build_method

    r = parse_recipe(recipe(sd["eps"], sd["prompts"], "emd", **LORA), "r")
    teacher = teacher_of(sd["eps"], sd["prompts"])
    m = build_method(r, DistContext(), teacher)
    m.initialize()
    base = dict(m.teacher.named_parameters())
    for student in (m.generator.denoiser, m.generator_ema.denoiser, m.fake):
        params = dict(student.named_parameters())
        frozen = {k: p for k, p in params.items() if ".lora_" not in k}
        assert frozen and all(p is base[k.replace(".base_layer.", ".")] for k, p in frozen.items())
    trained = [p for g in m.opt_gen.param_groups for p in g["params"]]
    assert trained and all(p.requires_grad for p in trained)
    assert sum(p.numel() for p in trained) < 0.2 * sum(p.numel() for p in base.values())
    seen: set = set()
    total = parameter_bytes(m.teacher, seen) + sum(parameter_bytes(x, seen) for x in m.modules().values())
    assert total < 1.5 * parameter_bytes(m.teacher)
    z = torch.randn(2, *m.img_shape, generator=fresh())
    labels = teacher.conditions(torch.tensor([0, 1]))
    sigma = m.generator.sigma_star
    assert torch.allclose(m.generator(z, labels), m.teacher(z * sigma, sigma, labels), atol=1e-5)


@pytest.mark.slow
def test_lora_run_resumes_bit_for_bit(sd, tmp_path):
    r = recipe(sd["eps"], sd["prompts"], "emd", teacher={"guidance": {"scale": 2.0}}, **LORA)
    run(r, tmp_path / "full")
    run({**r, "duration": 8}, tmp_path / "split")
    run(r, tmp_path / "split", resume=True)
    a, _ = CheckpointManager(tmp_path / "full").load()
    b, _ = CheckpointManager(tmp_path / "split").load()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Sampling a checkpoint (not the export): the adapters from it, the base from the teacher's pipeline.
    from emdctl.sampling import open_generator

    gen, _ = open_generator(tmp_path / "full", use_ema=False)
    teacher = teacher_of(sd["eps"], sd["prompts"]).init_weights()
    for k, v in gen.denoiser.state_dict().items():
        want = a[f"net.generator.denoiser.{k}"] if ".lora_" in k else teacher[k.replace(".base_layer.", ".")]
        assert torch.equal(v, want), k


@pytest.mark.slow
def test_two_gloo_processes_equal_one(sd, tmp_path):
    from .test_distributed import assert_two_processes_equal_one

    r = recipe(sd["eps"], sd["prompts"], "diff-instruct", teacher={"guidance": {"scale": 2.0}},
               batch={"size": 4, "micro": 2}, checkpoint={"every": 10_000})  # fmt: skip
    assert_two_processes_equal_one(tmp_path, r, iterations=4)


@pytest.mark.slow
def test_sdxl_and_sd3_teachers_distill(tmp_path):
    """SDXL (two text encoders, pooled embedding, added time ids) and an SD3-class flow
    transformer: a few EMD iterations each, finite and moving."""
    p = write_prompts(tmp_path / "p.txt")
    xl = teacher_of(build_sdxl(tmp_path / "xl"), p)
    net = xl.denoiser.network
    assert net.cond["pooled"] == 8 and net.time_ids.tolist() == [16, 16, 0, 0, 16, 16]
    run(recipe(tmp_path / "xl", p, "emd", teacher={"guidance": {"scale": 2.0}}), tmp_path / "run-xl")
    r = recipe(tmp_path / "sd3", p, "emd", generator={"sigma_init": 50.0})
    build_sd3(tmp_path / "sd3")
    _, summary = run(r, tmp_path / "run-sd3")
    assert summary["nan_skipped"] == 0


# -- sample, export, DiffusionPipeline --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_sample_export_and_diffusion_pipeline_give_the_same_image(sd, tmp_path, lora):
    from PIL import Image

    from emdctl.commands.export import export_command
    from emdctl.commands.sample import sample_command
    from emdctl.export_diffusers import pipeline_image

    # A learning rate at which 4 iterations move the images visibly (checked against the teacher below).
    r = recipe(sd["eps"], sd["prompts"], "emd", teacher={"guidance": {"scale": 3.0}}, optim={"lr_gen": 3e-3},
               **(LORA if lora else {}))  # fmt: skip
    run(r, tmp_path / "run")
    seeds = [int(s) for s in torch.randint(0, 10**6, (2,), generator=fresh())]
    prompt = "a handwritten digit seven"
    out = tmp_path / "samples"
    summary = sample_command(source=tmp_path / "run", teacher_recipe=None, seeds=seeds, out_dir=out, batch=1,
                             steps=None, fmt="png", class_label=None, use_ema=True, sampler="auto",
                             device_name="cpu", show_progress=False, prompt=prompt)  # fmt: skip
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["seed"] for row in rows] == seeds and {row["prompt"] for row in rows} == {prompt}
    assert summary["index"] == str(out / "index.jsonl")
    export_command(source=tmp_path / "run", fmt="diffusers", out=tmp_path / "pipe", lora_file=lora)
    for seed in seeds:
        png = Image.open(out / f"{seed // 1000 * 1000:06d}" / f"{seed:06d}.png")
        assert png.text["prompt"] == prompt
        ours = np.asarray(png).astype(np.float64) / 255
        theirs = pipeline_image(tmp_path / "pipe", prompt, seed)
        # PNG quantization (half a level) plus float rounding: at most one level of 255.
        assert np.abs(ours - theirs).max() <= 1 / 255, seed
    if lora:  # the adapters alone, on the teacher's own pipeline
        from diffusers import DiffusionPipeline, EulerDiscreteScheduler

        pipe = DiffusionPipeline.from_pretrained(sd["eps"])
        pipe.scheduler = EulerDiscreteScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
        args = {"num_inference_steps": 1, "guidance_scale": 0, "output_type": "np"}
        before = pipe(prompt, generator=torch.Generator().manual_seed(seeds[0]), **args).images[0]
        pipe.load_lora_weights(tmp_path / "pipe", weight_name="pytorch_lora_weights.safetensors")
        img = pipe(prompt, generator=torch.Generator().manual_seed(seeds[0]), **args).images[0]
        png = np.asarray(Image.open(out / f"{seeds[0] // 1000 * 1000:06d}" / f"{seeds[0]:06d}.png")) / 255
        assert np.abs(png - img).max() <= 1 / 255
        assert np.abs(png - before).max() > 4 / 255  # the student is not the teacher


def test_real_images_are_vae_latents_with_their_own_captions(sd, captioned, tmp_path):
    """A text teacher's real data: each image encoded to the mean of the VAE's posterior times the
    scaling factor, conditioned on the embedding of its own caption (not a drawn prompt)."""
    from diffusers import AutoencoderKL

    from emdctl.data import open_dataset
    from emdctl.distributed import DistContext
    from emdctl.methods import build_method

    r = recipe(sd["eps"], sd["prompts"], "dmd2")
    r["method"]["data"] = captioned
    r["batch"] = {"size": 8}
    m = build_method(parse_recipe(r, "r"), DistContext(), teacher_of(sd["eps"], sd["prompts"]))
    m.initialize()
    it = int(torch.randint(0, 100, (1,), generator=fresh()))
    ((latents, cond),) = m.real_batches(m.draws(it), it)
    rows = [json.loads(x) for x in Path(captioned["captions"]).read_text().splitlines()]
    vae = AutoencoderKL.from_pretrained(sd["eps"], subfolder="vae")
    ds = open_dataset(Path(captioned["path"]))
    from emdctl.data import to_model_range

    images = torch.stack([to_model_range(torch.from_numpy(ds.image(i)).permute(2, 0, 1)) for i in range(len(ds))])
    with torch.no_grad():
        want = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    table = m.real_conditions
    for x, c in zip(latents, cond, strict=True):  # match each real row to its image, then to its caption
        i = int((want - x).flatten(1).abs().amax(1).argmin())
        assert torch.allclose(x, want[i], atol=1e-4)
        assert torch.equal(c, table(torch.tensor([i]))[0])
        assert table.prompts[i] == rows[i]["prompt"]
    bad = tmp_path / "captions.jsonl"
    bad.write_text(json.dumps({"file": "000000/000000.png", "prompt": "x"}) + "\n")
    r["method"]["data"] = {**captioned, "captions": str(bad)}
    with pytest.raises(UserError, match="has no caption for 7 of 8 images"):
        build_method(parse_recipe(r, "r"), DistContext(), teacher_of(sd["eps"], sd["prompts"]))
    r["method"]["data"] = {"path": captioned["path"]}
    with pytest.raises(UserError, match="method.data.captions: the teacher is text-conditioned"):
        build_method(parse_recipe(r, "r"), DistContext(), teacher_of(sd["eps"], sd["prompts"]))


def test_export_and_sample_refuse_what_they_cannot_do(sd, tmp_path):
    from emdctl.commands.export import export_command
    from emdctl.commands.sample import sample_command

    run(recipe(sd["eps"], sd["prompts"], "diff-instruct", duration=4, generator={"sigma_init": 2.0}), tmp_path / "r")
    with pytest.raises(UserError, match="starts at the teacher's largest sigma"):
        export_command(source=tmp_path / "r", fmt="diffusers", out=tmp_path / "p")
    with pytest.raises(UserError, match="give --prompt"):
        sample_command(source=tmp_path / "r", teacher_recipe=None, seeds=[0], out_dir=tmp_path / "s", batch=1,
                       steps=None, fmt="png", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                       show_progress=False)  # fmt: skip


# -- recipes, teacher sampling, CLIP score ---------------------------------------------------------
def test_official_recipes_validate_offline_and_estimate_memory(monkeypatch):
    """sd15/sdxl/sd3 recipes parse without the network, and `recipe show` estimates their memory
    from emdctl's table of the official configs: SD 1.5's UNet has 859,520,964 parameters."""
    from typer.testing import CliRunner

    from emdctl.cli import app
    from tests.conftest import REPO

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    said = {}
    for name in ("sd15", "sdxl", "sd3"):
        result = CliRunner().invoke(app, ["recipe", "show", str(REPO / "recipes" / f"{name}.yaml")])
        assert result.exit_code == 0, result.output
        said[name] = result.output.splitlines()[-1]
    assert said["sd15"].startswith("# memory estimate: 860M parameters per network")
    assert "2,567M" in said["sdxl"] and "2,028M" in said["sd3"]
    from emdctl.memory import parameters_on_meta
    from emdctl.recipe import load_recipe
    from emdctl.teachers.diffusers_pipeline import offline_denoiser_config

    config, _ = offline_denoiser_config(load_recipe(REPO / "recipes" / "sd15.yaml").teacher)
    assert parameters_on_meta(config) == 859_520_964


def test_local_pipeline_estimate_counts_the_real_network(sd):
    from emdctl.memory import parameters_on_meta, recipe_estimate
    from emdctl.teachers.diffusers_pipeline import offline_denoiser_config

    r = parse_recipe(recipe(sd["eps"], sd["prompts"], **LORA), "r")
    config, where = offline_denoiser_config(r.teacher)
    teacher = teacher_of(sd["eps"], sd["prompts"])
    assert where == str(sd["eps"]) and config["label_dim"] == teacher.label_dim
    assert parameters_on_meta(config) == sum(p.numel() for p in teacher.denoiser.parameters())
    assert "prompt embeddings" in recipe_estimate(r)


def test_teacher_samples_with_guidance_and_prompts(sd, tmp_path):
    import yaml

    from emdctl.commands.sample import sample_command

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe(sd["eps"], sd["prompts"], teacher={"guidance": {"scale": 3.0}})))
    args = dict(source=None, teacher_recipe=f, seeds=[3, 4], batch=2, steps=3, fmt="png", class_label=None,
                use_ema=True, sampler="auto", device_name="cpu", show_progress=False)  # fmt: skip
    sample_command(out_dir=tmp_path / "a", prompt="two cats", **args)
    rows = [json.loads(x) for x in (tmp_path / "a" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["two cats"] * 2
    info = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert info["guidance"]["scale"] == 3.0 and info["img_shape"] == [3, 16, 16]
    with pytest.raises(UserError, match="give --prompt"):
        sample_command(out_dir=tmp_path / "b", **args)


def test_clip_score_is_the_cosine_of_clips_own_features(sd, tmp_path):
    """100 * max(cos, 0) per image against a float64 computation with the model's own feature
    functions, on fresh random 16x16 images (CLIP's input size: no resize) and the prompts of an index."""
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

    from emdctl.commands.evaluate import clip_command
    from emdctl.evaluation.clip import CLIP_MEAN, CLIP_STD, clip_scores
    from tests.tiny_pipelines import build_clip

    clip = build_clip(tmp_path / "clip")
    g = fresh()
    images = torch.randint(0, 256, (6, 16, 16, 3), generator=g, dtype=torch.uint8)
    prompts = [PROMPTS[int(i)] for i in torch.randint(0, 4, (6,), generator=g)]
    folder = tmp_path / "samples"
    (folder / "000000").mkdir(parents=True)
    rows = []
    for i, (img, p) in enumerate(zip(images, prompts, strict=True)):
        Image.fromarray(img.numpy()).save(folder / "000000" / f"{i:06d}.png")
        rows.append(json.dumps({"seed": i, "file": f"000000/{i:06d}.png", "prompt": p}))
    (folder / "index.jsonl").write_text("\n".join(rows) + "\n")
    model = CLIPModel.from_pretrained(clip).double().eval()
    tok = CLIPTokenizer.from_pretrained(clip)
    pix = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(CLIP_MEAN).double().reshape(1, 3, 1, 1)) / (
        torch.tensor(CLIP_STD).double().reshape(1, 3, 1, 1)
    )
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=pix)
        ft = model.get_text_features(**tok(prompts, padding=True, truncation=True, return_tensors="pt"))
    fi = fi if isinstance(fi, torch.Tensor) else fi.pooler_output
    ft = ft if isinstance(ft, torch.Tensor) else ft.pooler_output
    cos = torch.nn.functional.cosine_similarity(fi, ft)
    want = 100 * cos.clamp_min(0)
    fresh_model = CLIPModel.from_pretrained(clip).eval()
    got = clip_scores(fresh_model, tok, images, prompts, "cpu")
    assert torch.allclose(got.double(), want, atol=1e-3)
    raw = clip_scores(fresh_model, tok, images, prompts, "cpu", clamp=False)  # (a random CLIP may be all < 0)
    assert torch.allclose(raw.double(), 100 * cos, atol=1e-3) and float(cos.abs().min()) > 1e-3
    result = clip_command(samples=folder, clip=str(clip), n=None, device="cpu", json_out=tmp_path / "c.json")
    assert result["clip_score"] == pytest.approx(float(want.mean()), abs=1e-3) and result["n"] == 6
    with pytest.raises(UserError, match="no index.jsonl"):
        clip_command(samples=tmp_path, clip=str(clip), n=None, device="cpu", json_out=None)
    with pytest.raises(UserError, match="cannot load a CLIP model"):
        clip_command(samples=folder, clip=str(tmp_path / "nothing"), n=None, device="cpu", json_out=None)
