"""Generation at scale: `emdctl sample`.

Every image is a function of its seed alone: its latents and noise come from its own generator
(rng.PerSeedRandom), and the network is always evaluated on chunks of exactly SAMPLING_CHUNK rows
(the last chunk padded), because GPU and CPU kernels are not batch-size invariant at the last bit.
So the pixels are the same at any --batch and any number of processes. Seeds are processed in
shards of 1000; a finished shard is recorded and skipped when the command is re-run, so an
interrupted job resumes. Outputs:

* PNG: OUT/<seed // 1000 * 1000>/<seed>.png (NVlabs/edm's generate.py layout);
* npz: OUT/samples.npz with arr_0 = uint8 [N, H, W, C] (the ADM/EDM evaluation layout) and, for
  class-conditional models, arr_1 = labels; vectors (2-D problems) are stored as float32 [N, D].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .errors import UserError
from .generator import OneStepGenerator, load_generator
from .plots import save_image_grid, save_scatter, to_uint8
from .rng import PerSeedRandom
from .storage import atomic_path, atomic_write_json

SHARD = 1000
SAMPLING_CHUNK = 64  # rows per network call, fixed: the numerics of a call depend on its shape


def in_chunks(fn: Callable, seeds: list[int], chunk: int = SAMPLING_CHUNK):
    """fn(seeds) -> (x, labels) evaluated on fixed-size chunks (padded with repeats of the last seed)."""
    xs, ys = [], []
    for i in range(0, len(seeds), chunk):
        part = seeds[i : i + chunk]
        x, y = fn(part + [part[-1]] * (chunk - len(part)))
        xs.append(x[: len(part)])
        if y is not None:
            ys.append(y[: len(part)])
    return torch.cat(xs), (torch.cat(ys) if ys else None)


# --------------------------------------------------------------------------------------------
# Opening a generator


def open_generator(source: Path, use_ema: bool = True) -> tuple[OneStepGenerator, dict]:
    """A model directory written by `emdctl export`/a finished run, or a run directory (its final
    export, else its newest checkpoint)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such run or model directory")
    if (source / "config.json").is_file():
        return load_generator(source)
    if use_ema and (source / "generator" / "config.json").is_file():
        return load_generator(source / "generator")
    if (source / "checkpoints" / "manifest.json").is_file():
        return generator_from_checkpoint(source, use_ema)
    raise UserError(f"{source}: neither a model directory (config.json) nor a run directory (checkpoints/)")


def generator_from_checkpoint(run_dir: Path, use_ema: bool = True) -> tuple[OneStepGenerator, dict]:
    from .checkpoint import CheckpointManager, restore_module
    from .networks import build_denoiser

    tensors, meta = CheckpointManager(run_dir).load()
    cfg = meta.get("configs", {}).get("generator")
    if meta.get("kind") != "distill" or not cfg:
        raise UserError(f"{run_dir}: its checkpoints hold no generator (kind {meta.get('kind')!r})")
    gen = OneStepGenerator(build_denoiser(cfg["denoiser"]), cfg["sigma_star"])
    restore_module("net.generator_ema" if use_ema else "net.generator", gen, tensors, str(run_dir))
    return gen.eval().requires_grad_(False), {**cfg, "teacher": meta["configs"].get("teacher", {})}


def teacher_sampler(recipe_path: Path, steps: int, sampler: str, device) -> tuple[Callable, dict]:
    """A function seeds -> (samples, labels) for the teacher a recipe names."""
    from .networks.precond import DiscreteVPPrecond
    from .recipe import load_recipe
    from .samplers import ddpm_sampler, edm_sampler
    from .teachers import load_teacher

    r = load_recipe(recipe_path)
    if r.kind != "distill":
        raise UserError(f"{recipe_path}: --teacher needs a distillation recipe (it names the teacher)")
    teacher = load_teacher(r.teacher, seed=r.seed, device=device)
    den = teacher.denoiser

    def fn(seeds):
        rng = PerSeedRandom(seeds, device)
        latents = rng.randn(den.img_shape)
        labels = None
        if den.label_dim:
            labels = torch.nn.functional.one_hot(rng.randint(den.label_dim), den.label_dim).float()
        kind = sampler if sampler != "auto" else ("ddpm" if isinstance(den, DiscreteVPPrecond) else "heun")
        if kind == "ddpm":
            x = ddpm_sampler(den, latents, labels, rng, num_steps=steps)
        else:
            x = edm_sampler(den, latents, labels, rng, num_steps=steps, solver=kind)
        return x.float(), labels

    data = {"kind": "image", "range": [-1.0, 1.0]} if len(den.img_shape) == 3 else {"kind": "vector"}
    return fn, {"img_shape": list(den.img_shape), "label_dim": den.label_dim, "data": data, "teacher": teacher.source}


def generator_sampler(gen: OneStepGenerator, steps: int, class_label: int | None, device) -> Callable:
    gen = gen.to(device)

    def fn(seeds):
        rng = PerSeedRandom(seeds, device)
        z = rng.randn(gen.img_shape)
        labels = None
        if gen.label_dim:
            idx = (
                rng.randint(gen.label_dim)
                if class_label is None
                else torch.full((len(seeds),), class_label, device=device)
            )
            labels = torch.nn.functional.one_hot(idx, gen.label_dim).float()
        return gen.sample(z, labels, steps=steps, rng=rng).float(), labels

    return fn


# --------------------------------------------------------------------------------------------
# Writing


def _write_png(path: Path, arr: np.ndarray) -> None:
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)


def run_sampling(
    fn: Callable,
    info: dict,
    seeds: list[int],
    out_dir: Path,
    batch: int = 256,
    fmt: str = "png",
    rank: int = 0,
    world: int = 1,
    show_progress: bool = True,
) -> dict:
    """Generate `seeds` with `fn` into `out_dir`, skipping finished shards."""
    if fmt not in ("png", "npz", "both"):
        raise UserError(f"--format must be png, npz or both (got {fmt!r})")
    if batch <= 0:
        raise UserError("--batch must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / ".shards"
    state_dir.mkdir(exist_ok=True)
    is_image = info["data"].get("kind") == "image"
    want_png = fmt in ("png", "both") and is_image
    want_npz = fmt in ("npz", "both") or not is_image
    shards = [seeds[i : i + SHARD] for i in range(0, len(seeds), SHARD)]
    mine = [(i, s) for i, s in enumerate(shards) if i % world == rank]
    todo = [(i, s) for i, s in mine if not (state_dir / f"shard-{i:06d}.done").exists()]
    done_before = sum(len(s) for _, s in mine) - sum(len(s) for _, s in todo)
    t0 = time.time()
    bar = tqdm(
        total=sum(len(s) for _, s in mine),
        initial=done_before,
        unit="img",
        disable=not show_progress,
        desc="sampling",
        dynamic_ncols=True,
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, shard_seeds in todo:
            chunks_x, chunks_y = [], []
            for b in range(0, len(shard_seeds), batch):
                part = shard_seeds[b : b + batch]
                x, labels = in_chunks(fn, part)
                x = x.cpu()
                if is_image:
                    arr = to_uint8(x).permute(0, 2, 3, 1).numpy()
                    if want_png:
                        futures = [
                            pool.submit(_write_png, out_dir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png", a)
                            for s, a in zip(part, arr, strict=True)
                        ]
                        for f in futures:
                            f.result()
                    chunks_x.append(arr)
                else:
                    chunks_x.append(x.numpy().astype(np.float32))
                if labels is not None:
                    chunks_y.append(labels.argmax(1).cpu().numpy())
                bar.update(len(part))
            if want_npz:
                payload = {"x": np.concatenate(chunks_x), "seeds": np.asarray(shard_seeds, dtype=np.int64)}
                if chunks_y:
                    payload["y"] = np.concatenate(chunks_y)
                with atomic_path(state_dir / f"shard-{i:06d}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, **payload)
            atomic_write_json(state_dir / f"shard-{i:06d}.done", {"seeds": len(shard_seeds)})
    bar.close()
    elapsed = time.time() - t0
    generated = sum(len(s) for _, s in todo)
    summary = {
        "images": len(seeds),
        "generated_now": generated,
        "seconds": elapsed,
        "images_per_s": generated / elapsed if elapsed > 0 else None,
    }
    if rank == 0 and all((state_dir / f"shard-{i:06d}.done").exists() for i in range(len(shards))):
        if want_npz:
            summary["npz"] = str(assemble_npz(out_dir, len(shards)))
        _preview(out_dir, shards, state_dir, is_image, want_npz)
        atomic_write_json(out_dir / "sampling.json", {**info, "seeds": [seeds[0], seeds[-1]], "n": len(seeds)})
    return summary


def _preview(out_dir: Path, shards, state_dir: Path, is_image: bool, have_npz: bool) -> None:
    first = shards[0][:64]
    if have_npz:
        with np.load(state_dir / "shard-000000.npz") as z:
            x = torch.from_numpy(z["x"][: len(first)])
    else:
        x = torch.stack(
            [
                torch.from_numpy(np.array(Image.open(out_dir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png")))
                for s in first
            ]
        )
        x = x[..., None] if x.ndim == 3 else x
    if is_image:
        save_image_grid(x.permute(0, 3, 1, 2).contiguous(), out_dir / "grid.png")
    else:
        with np.load(state_dir / "shard-000000.npz") as z:
            pts = torch.from_numpy(z["x"][:4000])
        if pts.shape[1] == 2:
            save_scatter(pts, out_dir / "scatter.png")


def assemble_npz(out_dir: Path, num_shards: int) -> Path:
    xs, ys = [], []
    for i in range(num_shards):
        with np.load(out_dir / ".shards" / f"shard-{i:06d}.npz") as z:
            xs.append(z["x"])
            if "y" in z:
                ys.append(z["y"])
    payload = {"arr_0": np.concatenate(xs)}
    if ys:
        payload["arr_1"] = np.concatenate(ys)
    path = out_dir / "samples.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **payload)
    return path


def sample_command(
    source: Path | None,
    teacher_recipe: Path | None,
    seeds: list[int],
    out_dir: Path,
    batch: int,
    steps: int,
    fmt: str,
    class_label: int | None,
    use_ema: bool,
    sampler: str,
    device_name: str,
    show_progress: bool = True,
) -> dict:
    """What `emdctl sample` does after parsing."""
    from . import distributed

    dist = distributed.init(device_name)
    try:
        if teacher_recipe is not None:
            fn, info = teacher_sampler(teacher_recipe, steps, sampler, dist.device)
        else:
            if source is None:
                raise UserError("give a run or model directory to sample from, or --teacher RECIPE")
            gen, cfg = open_generator(source, use_ema)
            if class_label is not None and not (0 <= class_label < gen.label_dim):
                raise UserError(f"--class {class_label}: the generator has {gen.label_dim} classes")
            fn = generator_sampler(gen, steps, class_label, dist.device)
            info = {
                "img_shape": list(gen.img_shape),
                "label_dim": gen.label_dim,
                "data": cfg.get("data", {}),
                "generator": str(source),
                "steps": steps,
                "ema": use_ema,
            }
        with torch.no_grad():
            summary = run_sampling(
                fn, info, seeds, out_dir, batch, fmt, dist.rank, dist.world_size, show_progress and dist.is_main
            )
        dist.barrier()
        return summary
    finally:
        distributed.shutdown()
