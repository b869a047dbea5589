"""Generation at scale: `emdctl sample`.

Every image is a function of its seed alone: its latents and noise come from its own generator
(rng.PerSeedRandom), and the network is always evaluated on chunks of exactly SAMPLING_CHUNK rows
(the last chunk padded), because GPU and CPU kernels are not batch-size invariant at the last bit.
So the pixels are the same at any --batch and any number of processes. Every finished batch is
recorded by its range of positions in the seed list, so a re-run (with any --batch) generates only
what is missing; processes split the seeds in blocks of 1000. Outputs:

* PNG: OUT/<seed // 1000 * 1000>/<seed>.png (NVlabs/edm's generate.py layout);
* npz: OUT/samples.npz with arr_0 = uint8 [N, H, W, C] (the ADM/EDM evaluation layout) and, for
  class-conditional models, arr_1 = labels; vectors (2-D problems) are stored as float32 [N, D].
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .generator import OneStepGenerator, generator_from_config, load_generator
from .plots import save_image_grid, save_scatter, to_uint8
from .progress import Progress
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
    if not source.is_dir():
        raise UserError(f"{source}: not a directory; give a run directory or an exported generator directory")
    if (source / "config.json").is_file():
        from .storage import read_json

        config = read_json(source / "config.json", "model config")
        if config.get("format") == "emdctl-export":  # an ONNX or TorchScript export
            from .export import ExportedGenerator

            return ExportedGenerator(source, config), config
        return load_generator(source)
    if use_ema and (source / "generator" / "config.json").is_file():
        return load_generator(source / "generator")
    if (source / "checkpoints" / "manifest.json").is_file():
        return generator_from_checkpoint(source, use_ema)
    raise UserError(f"{source}: neither a model directory (config.json) nor a run directory (checkpoints/)")


def generator_from_checkpoint(run_dir: Path, use_ema: bool = True) -> tuple[OneStepGenerator, dict]:
    from .checkpoint import CheckpointManager, restore_module

    tensors, meta = CheckpointManager(run_dir).load()
    cfg = meta.get("configs", {}).get("generator")
    if meta.get("kind") != "distill" or not cfg:
        raise UserError(f"{run_dir}: its checkpoints hold no generator (kind {meta.get('kind')!r})")
    gen = generator_from_config(cfg)
    restore_module("net.generator_ema" if use_ema else "net.generator", gen, tensors, str(run_dir))
    return gen.eval().requires_grad_(False), {**cfg, "teacher": meta["configs"].get("teacher", {})}


def teacher_sampler(recipe_path: Path, steps: int | None, sampler: str, device) -> tuple[Callable, dict]:
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
            x = edm_sampler(den, latents, labels, rng, num_steps=steps or 18, solver=kind)
        return x.float(), labels

    data = {"kind": "image", "range": [-1.0, 1.0]} if len(den.img_shape) == 3 else {"kind": "vector"}
    return fn, {"img_shape": list(den.img_shape), "label_dim": den.label_dim, "data": data, "teacher": teacher.source}


def newest_finished_run(runs_root: Path = Path("runs")) -> Path:
    """The run under runs_root that finished last (its summary.json and generator/ written)."""
    done = [p.parent for p in Path(runs_root).glob("*/summary.json") if (p.parent / "generator").is_dir()]
    if not done:
        raise UserError(
            f"no source given and no finished run under {runs_root}/; give a run or model directory "
            "(e.g. runs/default after `emdctl distill`)"
        )
    return max(done, key=lambda d: (d / "summary.json").stat().st_mtime)


def generator_sampler(gen: OneStepGenerator, steps: int | None, class_label: int | None, device) -> Callable:
    """seeds -> (samples, one-hot labels or None), each row a function of its seed: what `emdctl
    sample` writes and what `emdctl evaluate` measures. Images are floats in [-1, 1], or uint8 from
    an ONNX/TorchScript export (which quantizes itself)."""
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
        x = gen.sample(z, labels, steps=steps, rng=rng)
        return (x if x.dtype == torch.uint8 else x.float()), labels

    return fn


# --------------------------------------------------------------------------------------------
# Writing


def _write_png(path: Path, arr: np.ndarray) -> None:
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _uncovered(a: int, b: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    gaps, cur = [], a
    for x, y in done:
        if y <= cur or x >= b:
            continue
        if x > cur:
            gaps.append((cur, x))
        cur = max(cur, y)
    if cur < b:
        gaps.append((cur, b))
    return gaps


def _done_parts(state_dir: Path) -> list[tuple[int, int]]:
    parts = []
    for p in state_dir.glob("part-*.done"):
        a, b = p.stem.split("-")[1:3]
        parts.append((int(a), int(b)))
    return _merge(parts)


def _check_seeds(state_dir: Path, seeds: list[int]) -> None:
    """An output directory belongs to one seed list; resuming with another would mix samples."""
    digest = hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()
    record = state_dir / "seeds.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("sha256") != digest:
            raise UserError(
                f"{state_dir.parent}: holds samples of other seeds ({old.get('n')} seeds from {old.get('first')}); "
                "use another --out"
            )
    else:
        atomic_write_json(record, {"n": len(seeds), "first": seeds[0], "last": seeds[-1], "sha256": digest})


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
    barrier: Callable[[], None] = lambda: None,
    keep_float: bool = False,
) -> dict:
    """Generate `seeds` with `fn` into `out_dir`. Each finished batch is recorded (by its range of
    positions in the seed list), so a re-run, with any --batch, generates only what is missing.
    keep_float: images also go into the npz unquantized (arr_float, float32 [N, H, W, C])."""
    if fmt not in ("png", "npz", "both"):
        raise UserError(f"--format must be png, npz or both (got {fmt!r})")
    if batch <= 0:
        raise UserError("--batch must be positive")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory; give a folder for the samples")
    state_dir = out_dir / ".shards"
    state_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _check_seeds(state_dir, seeds)
    barrier()
    is_image = info["data"].get("kind") == "image"
    want_png = fmt in ("png", "both") and is_image
    want_npz = fmt in ("npz", "both") or not is_image
    if keep_float and not (is_image and want_npz):
        raise UserError("--keep-float needs images and --format npz or both")
    n = len(seeds)
    blocks = [(a, min(a + SHARD, n)) for a in range(0, n, SHARD)][rank::world]
    done = _done_parts(state_dir)
    if keep_float and not all(_has_floats(p) for p in state_dir.glob("part-*.npz")):
        raise UserError(f"{out_dir}: holds shards sampled without --keep-float; delete it or use another --out")
    todo = []
    for a, b in blocks:
        for gx, gy in _uncovered(a, b, done):
            todo += [(x, min(x + batch, gy)) for x in range(gx, gy, batch)]
    total = sum(b - a for a, b in blocks)
    t0 = time.time()
    with Progress(total, "sampling", "img", enabled=show_progress) as bar:
        bar.start_at(total - sum(b - a for a, b in todo))
        with ThreadPoolExecutor(max_workers=8) as pool:
            for a, b in todo:
                part = seeds[a:b]
                x, labels = in_chunks(fn, part)
                x = x.cpu()
                if is_image:
                    arr = to_uint8(x).permute(0, 2, 3, 1).numpy()
                    if want_png:
                        files = [out_dir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png" for s in part]
                        for f in [pool.submit(_write_png, path, img) for path, img in zip(files, arr, strict=True)]:
                            f.result()
                else:
                    arr = x.numpy().astype(np.float32)
                if want_npz:
                    payload = {"x": arr, "seeds": np.asarray(part, dtype=np.int64)}
                    if keep_float:
                        payload["xf"] = x.float().permute(0, 2, 3, 1).numpy()
                    if labels is not None:
                        payload["y"] = labels.argmax(1).cpu().numpy()
                    with atomic_path(state_dir / f"part-{a:09d}-{b:09d}.npz") as tmp, open(tmp, "wb") as f:
                        np.savez(f, **payload)
                atomic_write_json(state_dir / f"part-{a:09d}-{b:09d}.done", {"seeds": b - a})
                bar.advance(b - a)
    elapsed = time.time() - t0
    generated = sum(b - a for a, b in todo)
    summary = {"images": n, "generated_now": generated, "seconds": elapsed,
               "images_per_s": generated / elapsed if elapsed > 0 and generated else None}  # fmt: skip
    barrier()
    if rank == 0 and _done_parts(state_dir) == [(0, n)]:
        if want_npz:
            summary["npz"] = str(assemble_npz(out_dir, keep_float))
        summary["preview"] = _preview(out_dir, seeds, is_image, want_npz)
        atomic_write_json(out_dir / "sampling.json", {**info, "seeds": [seeds[0], seeds[-1]], "n": n})
    return summary


PREVIEW_DIR = ".preview"  # hidden, so that no image-folder reader takes a preview for a sample


def _preview(out_dir: Path, seeds: list[int], is_image: bool, have_npz: bool) -> Path | None:
    if have_npz:
        with np.load(out_dir / "samples.npz") as z:
            x = torch.from_numpy(z["arr_0"][:4000])
    else:
        files = [out_dir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png" for s in seeds[:64]]
        x = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files])
        x = x[..., None] if x.ndim == 3 else x
    if is_image:
        path = out_dir / PREVIEW_DIR / "grid.png"
        save_image_grid(x[:64].permute(0, 3, 1, 2).contiguous(), path)
        return path
    if x.shape[1] == 2:
        path = out_dir / PREVIEW_DIR / "scatter.png"
        save_scatter(x, path)
        return path
    return None


def _has_floats(part: Path) -> bool:
    with np.load(part) as z:
        return "xf" in z.files


def assemble_npz(out_dir: Path, keep_float: bool = False) -> Path:
    parts = sorted((out_dir / ".shards").glob("part-*.npz"))
    xs, ys, xfs = [], [], []
    for p in parts:
        with np.load(p) as z:
            xs.append(z["x"])
            if "y" in z:
                ys.append(z["y"])
            if keep_float:
                xfs.append(z["xf"])
    payload = {"arr_0": np.concatenate(xs)}
    if ys:
        payload["arr_1"] = np.concatenate(ys)
    if keep_float:
        payload["arr_float"] = np.concatenate(xfs)
    path = out_dir / "samples.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **payload)
    return path


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
) -> dict:
    """What `emdctl sample` does after parsing. No source and no teacher: the newest finished run
    under runs/ (and `log` says which)."""
    from . import distributed
    from .threads import cpu_threads

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
                raise UserError(f"--class {class_label}: the generator has {gen.label_dim} classes")
            if keep_float and not isinstance(gen, OneStepGenerator):
                raise UserError(f"--keep-float: {source} is an ONNX/TorchScript export, which returns quantized images")
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
            }
        with torch.no_grad(), cpu_threads(threads, is_vector, dist.device):
            summary = run_sampling(fn, info, seeds, out_dir, batch, fmt, dist.rank, dist.world_size,
                                   show_progress and dist.is_main, dist.barrier, keep_float)  # fmt: skip
    return {**summary, "source": str(source) if source is not None else str(teacher_recipe)}
