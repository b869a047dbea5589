"""`emdctl sample`: a generator (run, export) or a recipe's teacher, sampled seed by seed into a
folder (emdctl.sampling does the writing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..generator import OneStepGenerator
from ..rng import PerSeedRandom
from ..runs import newest_finished_run
from ..sampling import generator_sampler, open_generator, run_sampling, weights_digest


def teacher_sampler(
    recipe_path: Path, steps: int | None, sampler: str, device, prompts: list[str] | None = None
) -> tuple[Callable, dict]:
    """A function seeds -> (samples, labels) for the teacher a recipe names (with its guidance; a
    text-conditioned teacher takes `prompts`, seed s prompt s mod N, and its latents are decoded)."""
    from ..networks.precond import DiscreteVPPrecond
    from ..recipe import load_recipe
    from ..solvers import ddpm_sampler, edm_sampler
    from ..teachers import load_teacher

    r = load_recipe(recipe_path)
    if r.kind != "distill":
        raise UserError(f"{recipe_path}: a {r.kind} recipe names no teacher to sample; give a distillation recipe")
    if r.teacher.kind == "diffusers":
        return _diffusers_teacher_sampler(r, steps, sampler, device, prompts)
    if prompts is not None:
        raise UserError(f"{recipe_path}: its teacher is not text-conditioned; drop --prompt/--prompts")
    teacher = load_teacher(r.teacher, seed=r.seed, device=device)
    den = teacher.denoiser

    def fn(seeds):
        rng = PerSeedRandom(seeds, device)
        latents, labels = rng.latents_and_labels(den.img_shape, den.label_dim)
        kind = sampler if sampler != "auto" else ("ddpm" if isinstance(den, DiscreteVPPrecond) else "heun")
        if kind == "ddpm":
            x = ddpm_sampler(den, latents, labels, rng, num_steps=steps)
        else:
            x = edm_sampler(den, latents, labels, rng, num_steps=steps or 18, solver=kind)
        return x.float(), labels

    data = {"kind": "image", "range": [-1.0, 1.0]} if len(den.img_shape) == 3 else {"kind": "vector"}
    info = {"img_shape": list(den.img_shape), "label_dim": den.label_dim, "data": data, "teacher": teacher.source,
            "weights": weights_digest(den), "steps": steps, "sampler": sampler}  # fmt: skip
    return fn, info


def sample_command(
    *,
    source: Path | None,
    teacher_recipe: Path | None,
    seeds: list[int],
    out_dir: Path,
    batch: int,
    steps: int | None,
    fmt: str,
    class_label: int | None,
    use_ema: bool,
    sampler: str,
    device_name: str,
    show_progress: bool = True,
    keep_float: bool = False,
    threads: str | int = "auto",
    log=print,
    force: bool = False,
    prompt: str | None = None,
    prompts_file: Path | None = None,
) -> dict:
    """What `emdctl sample` does after parsing. No source and no teacher: the newest finished run
    under runs/ (and `log` says which). `force`: an output folder of other samples is moved aside."""
    from .. import distributed
    from ..threads import cpu_threads

    with distributed.session(device_name) as dist:
        if teacher_recipe is not None:
            from ..conditioning import read_prompts

            if prompt is not None and prompts_file is not None:
                raise UserError("give --prompt or --prompts, not both")
            text = [prompt] if prompt is not None else read_prompts(prompts_file, "--prompts") if prompts_file else None
            fn, info = teacher_sampler(teacher_recipe, steps, sampler, dist.device, text)
            is_vector = len(info["img_shape"]) == 1
        else:
            if source is None:
                source = newest_finished_run()
                log(f"sampling the newest finished run: {source}")
            gen, cfg = open_generator(source, use_ema)
            text = _prompted(cfg, prompt, prompts_file, source)
            if text is not None:
                fn, info = prompted_sampler(gen, cfg, text, steps, dist.device)
                info = {**info, "generator": str(source), "ema": use_ema}
                is_vector = False
            else:
                if class_label is not None and not (0 <= class_label < gen.label_dim):
                    raise UserError(f"class label {class_label}: the generator has {gen.label_dim} classes")
                if keep_float and not isinstance(gen, OneStepGenerator):
                    raise UserError(f"keeping float images: {source} is an ONNX/TorchScript export (quantized output)")
                fn = generator_sampler(gen, steps, class_label, dist.device)
                is_vector = len(gen.img_shape) == 1
                info = {
                    "img_shape": list(gen.img_shape),
                    "label_dim": gen.label_dim,
                    "data": cfg.get("data", {}),
                    "generator": str(source),
                    "steps": steps or gen.steps,
                    "levels": gen.sampling_levels(steps),
                    "sampler": gen.sampler,
                    "ema": use_ema,
                    "class": class_label,
                    "weights": weights_digest(gen) if isinstance(gen, OneStepGenerator) else cfg.get("file_sha256"),
                }
        with torch.no_grad(), cpu_threads(threads, is_vector, dist.device):
            summary = run_sampling(fn, info, seeds, out_dir, batch, fmt, dist.rank, dist.world_size,
                                   show_progress and dist.is_main, dist.barrier, keep_float, force)  # fmt: skip
    return {**summary, "source": str(source) if source is not None else str(teacher_recipe)}


def _prompted(cfg: dict, prompt: str | None, prompts_file: Path | None, source) -> list[str] | None:
    """The prompts to sample a text-conditioned generator with (--prompt, or --prompts FILE), or
    None for any other generator (which refuses them)."""
    from ..conditioning import read_prompts

    data = cfg.get("data", {})
    conditioned = (cfg.get("teacher", {}).get("conditions") or {}).get("kind") == "prompts"
    if prompt is not None and prompts_file is not None:
        raise UserError("give --prompt or --prompts, not both")
    if not conditioned:
        if prompt is not None or prompts_file is not None:
            raise UserError(f"{source}: this generator is not text-conditioned; drop --prompt/--prompts")
        return None
    if not data.get("pipeline"):
        raise UserError(f"{source}: the generator's config names no diffusers pipeline to encode prompts with")
    if prompt is None and prompts_file is None:
        raise UserError(f'{source}: a text-conditioned generator: give --prompt "..." or --prompts FILE')
    return [prompt] if prompt is not None else read_prompts(prompts_file, "--prompts")


def prompted_sampler(gen, cfg: dict, prompts: list[str], steps: int | None, device) -> tuple[Callable, dict]:
    """seeds -> (images, None) for a student of a text-conditioned diffusers teacher: seed s takes
    prompt s mod len(prompts); its latent is drawn as a diffusers pipeline draws it from
    torch.Generator().manual_seed(s); the generator's latents are decoded by the teacher's VAE."""
    from ..teachers.diffusers_pipeline import decoder_from_info, encode_prompts

    data = cfg["data"]
    table, _, _ = encode_prompts(Path(data["pipeline"]), data.get("variant"), prompts, device, warn=print)
    if table.shape[1] != gen.label_dim:
        raise UserError(f"{data['pipeline']}: its text encoders give {table.shape[1]} values per prompt, the generator "
                        f"takes {gen.label_dim}; it was not trained with this pipeline")  # fmt: skip
    decode = decoder_from_info(data)
    gen = gen.to(device)

    def fn(seeds):
        rng = PerSeedRandom(seeds, device, raw=True)
        z = rng.randn(tuple(gen.img_shape))
        labels = table[torch.tensor([s % len(prompts) for s in seeds])].to(device)
        x = gen.sample(z, labels, steps=steps, rng=rng)
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"the generator gives non-finite samples (seeds {seeds[0]}-{seeds[-1]}): it diverged")
        return (decode(x) if decode else x).float(), None

    shape = list(decode.image_shape(gen.img_shape) if decode else gen.img_shape)
    info = {"img_shape": shape, "label_dim": 0, "data": {"kind": "image", "range": [-1.0, 1.0]},
            "steps": steps or gen.steps, "levels": gen.sampling_levels(steps), "sampler": gen.sampler,
            "weights": weights_digest(gen), "prompts": prompts}  # fmt: skip
    return fn, info


def _diffusers_teacher_sampler(r, steps, sampler, device, prompts) -> tuple[Callable, dict]:
    """A diffusers teacher, guided as its recipe says, by EDM's Heun/Euler sampler over its own
    noise range (default 18 steps); seed s draws its latent as a diffusers pipeline does."""
    import tempfile

    from ..solvers import edm_sampler
    from ..teachers import load_teacher

    if sampler == "ddpm":
        raise UserError("--sampler ddpm is for the MNIST DDPM; a diffusers teacher takes heun or euler")
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = None
        if prompts is not None:
            prompt_file = Path(tmp) / "prompts.txt"
            prompt_file.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
        try:
            teacher = load_teacher(r.teacher, seed=r.seed, device=device, prompts=prompt_file)
        except UserError as e:
            if "data.prompts: this teacher is text-conditioned" in str(e):
                raise UserError('a text-conditioned teacher: give --prompt "..." or --prompts FILE') from None
            raise
    den, decode, count = teacher.denoiser, teacher.decode, teacher.conditions.count
    solver = "heun" if sampler == "auto" else sampler

    def fn(seeds):
        rng = PerSeedRandom(seeds, device, raw=True)
        z = rng.randn(tuple(den.img_shape))
        labels = teacher.conditions(torch.tensor([s % count for s in seeds], device=device)) if count else None
        x = edm_sampler(den, z, labels, rng, num_steps=steps or 18, sigma_max=den.sigma_max, solver=solver)
        return (decode(x.float()) if decode else x).float(), None

    shape = list(teacher.pixel_shape)
    info = {"img_shape": shape, "label_dim": 0, "data": {"kind": "image", "range": [-1.0, 1.0]},
            "teacher": teacher.source, "weights": weights_digest(den), "steps": steps or 18, "sampler": solver,
            "guidance": teacher.extra.get("guidance"), "prompts": list(prompts) if prompts else None}  # fmt: skip
    return fn, info
