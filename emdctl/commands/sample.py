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


def teacher_sampler(recipe_path: Path, steps: int | None, sampler: str, device) -> tuple[Callable, dict]:
    """A function seeds -> (samples, labels) for the teacher a recipe names."""
    from ..networks.precond import DiscreteVPPrecond
    from ..recipe import load_recipe
    from ..solvers import ddpm_sampler, edm_sampler
    from ..teachers import load_teacher

    r = load_recipe(recipe_path)
    if r.kind != "distill":
        raise UserError(f"{recipe_path}: a {r.kind} recipe names no teacher to sample; give a distillation recipe")
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
) -> dict:
    """What `emdctl sample` does after parsing. No source and no teacher: the newest finished run
    under runs/ (and `log` says which). `force`: an output folder of other samples is moved aside."""
    from .. import distributed
    from ..threads import cpu_threads

    with distributed.session(device_name) as dist:
        if teacher_recipe is not None:
            fn, info = teacher_sampler(teacher_recipe, steps, sampler, dist.device)
            is_vector = len(info["img_shape"]) == 1
        else:
            if source is None:
                source = newest_finished_run()
                log(f"sampling the newest finished run: {source}")
            gen, cfg = open_generator(source, use_ema)
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
