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

import contextlib
import json
import math
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
from .seeds import Seeds
from .storage import DirectoryLock, atomic_path, atomic_write_json, first_nonfinite, move_aside, read_json

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
    directory = source if (source / "config.json").is_file() else source / "generator"
    if directory == source or (use_ema and (directory / "config.json").is_file()):
        config = read_json(directory / "config.json", "model config")
        if config.get("format") == "emdctl-export":  # an ONNX or TorchScript export
            from .export import ExportedGenerator

            return ExportedGenerator(directory, config), config
        gen, config = load_generator(directory)
        refuse_nonfinite_weights(gen, directory)
        return gen, config
    if (source / "checkpoints" / "manifest.json").is_file():
        return generator_from_checkpoint(source, use_ema)
    raise UserError(f"{source}: neither a model directory (config.json) nor a run directory (checkpoints/)")


def generator_from_checkpoint(run_dir: Path, use_ema: bool = True) -> tuple[OneStepGenerator, dict]:
    from .checkpoint import CheckpointManager, restore_module

    manager = CheckpointManager(run_dir)
    tensors, meta = manager.load(repair=False)  # a reader changes nothing in the run
    for note in manager.notes:
        print(f"{run_dir}: {note}")
    cfg = meta.get("configs", {}).get("generator")
    if meta.get("kind") != "distill" or not cfg:
        raise UserError(f"{run_dir}: its checkpoints hold no generator (kind {meta.get('kind')!r})")
    gen = generator_from_config(cfg)
    prefix = "net.generator_ema" if use_ema else "net.generator"
    skip = frozenset()
    if cfg["denoiser"].get("arch_kwargs", {}).get("lora"):
        skip = _teacher_base_into(gen, cfg, run_dir)  # a LoRA run checkpoints the adapters alone
    restore_module(prefix, gen, tensors, str(run_dir), skip)
    refuse_nonfinite_weights(gen, run_dir)
    return gen.eval().requires_grad_(False), {**cfg, "teacher": meta["configs"].get("teacher", {})}


def _teacher_base_into(gen: OneStepGenerator, cfg: dict, run_dir: Path) -> frozenset:
    """Load the frozen base of a LoRA generator from its teacher's pipeline (its checkpoints hold
    only the adapters); returns the data_ptrs of the base tensors."""
    from .networks.diffusers_nets import with_lora_keys
    from .teachers.diffusers_pipeline import load_pipeline_denoiser

    data = cfg.get("data", {})
    root = Path(data.get("pipeline") or "")
    if not (root / "model_index.json").is_file():
        raise UserError(f"{run_dir}: its checkpoints hold LoRA adapters, and the teacher pipeline {root} is gone")
    cond = cfg["denoiser"]["arch_kwargs"]["cond"]
    base = load_pipeline_denoiser(root, data.get("variant"), None, cond).state_dict()  # (weights: any resolution)
    den = gen.denoiser
    den.load_state_dict(with_lora_keys(den.state_dict(), base), strict=False)
    return frozenset(p.data_ptr() for n, p in den.named_parameters() if ".lora_" not in n)


def refuse_nonfinite_weights(gen: torch.nn.Module, source: Path) -> None:
    key = first_nonfinite(gen)
    if key is not None:
        raise UserError(
            f"{source}: the generator's weights hold NaN/inf ({key}); it diverged: use an earlier checkpoint"
        )


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes): the identity of what samples."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def generator_sampler(
    gen: OneStepGenerator, steps: int | None, class_label: int | None, device, refuse_nonfinite: bool = True
) -> Callable:
    """seeds -> (samples, one-hot labels or None), each row a function of its seed: what `emdctl
    sample` writes and what `emdctl evaluate` measures. Images are floats in [-1, 1], or uint8 from
    an ONNX/TorchScript export (which quantizes itself). A generator whose samples are not finite
    (it diverged) is refused with one line instead of writing NaN images."""
    gen = gen.to(device)

    def fn(seeds):
        rng = PerSeedRandom(seeds, device)
        z, labels = rng.latents_and_labels(gen.img_shape, gen.label_dim, class_label)
        x = gen.sample(z, labels, steps=steps, rng=rng)
        if refuse_nonfinite and x.dtype != torch.uint8 and not bool(torch.isfinite(x).all()):
            raise UserError(
                f"the generator gives non-finite samples (seeds {seeds[0]}-{seeds[-1]}): it diverged; sample an "
                "earlier checkpoint or retrain with a lower learning rate"
            )
        return (x if x.dtype == torch.uint8 else x.float()), labels

    return fn


# --------------------------------------------------------------------------------------------
# Writing


def _write_png(path: Path, arr: np.ndarray, prompt: str | None = None) -> None:
    from PIL.PngImagePlugin import PngInfo

    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    text = None
    if prompt is not None:  # the prompt travels with the image (PNG iTXt chunk "prompt")
        text = PngInfo()
        text.add_itxt("prompt", prompt)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1, pnginfo=text)


IDENTITY = "identity.json"


def _check_identity(out_dir: Path, state_dir: Path, identity: dict, force: bool) -> None:
    """An output folder belongs to one (source weights, steps, sampler, format, seeds, ...): a
    folder of other samples is refused (or moved aside with `force`), so samples never mix."""
    record = state_dir / IDENTITY
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            old = {"unreadable": True}
        differs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    elif out_dir.exists() and any(out_dir.iterdir()):
        differs = ["(an existing folder without emdctl's sampling record)"]
    else:
        differs = []
    if differs and force:
        print(f"moved the previous samples aside to {move_aside(out_dir)}")
    elif differs:
        raise UserError(
            f"{out_dir}: holds other samples ({', '.join(differs)} differ); choose another output folder, or "
            "pass --force to move the old one aside"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        atomic_write_json(record, identity)


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _block_name(a: int) -> str:
    return f"block-{a:012d}"


def run_sampling(
    fn: Callable,
    info: dict,
    seeds: Seeds,
    out_dir: Path,
    batch: int = 256,
    fmt: str = "png",
    rank: int = 0,
    world: int = 1,
    show_progress: bool = True,
    barrier: Callable[[], None] = lambda: None,
    keep_float: bool = False,
    force: bool = False,
) -> dict:
    """Generate `seeds` with `fn` into `out_dir`, in blocks of SHARD positions of the seed list. A
    block is recorded when all of it is written (its npz, then its .done), so a re-run, with any
    batch size or number of processes, generates exactly the blocks that are missing, and no image
    can be written twice. The folder is locked while it is sampled, and belongs to one identity
    (the source's weights, steps, sampler, format, seeds: see _check_identity).
    keep_float: images also go into the npz unquantized (arr_float, float32 [N, H, W, C])."""
    if fmt not in ("png", "npz", "both"):
        raise UserError(f"format must be png, npz or both (got {fmt!r})")
    if batch <= 0:
        raise UserError("the batch size must be positive")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; give a folder for the samples")
    is_image = info["data"].get("kind") == "image"
    prompts = info.get("prompts")
    prompt_of = (lambda seed: prompts[seed % len(prompts)]) if prompts else None  # noqa: E731
    want_png = fmt in ("png", "both") and is_image
    want_npz = fmt in ("npz", "both") or not is_image
    if keep_float and not (is_image and want_npz):
        raise UserError("keeping float images needs images and the npz or both format")
    seeds = seeds if isinstance(seeds, Seeds) else Seeds([range(s, s + 1) for s in seeds])
    n = len(seeds)
    identity = {  # what decides the pixels: the same weights from another path resume the same folder
        "weights": info.get("weights"),
        "steps": info.get("steps"),
        "levels": info.get("levels"),
        "sampler": info.get("sampler"),
        "ema": info.get("ema"),
        "class": info.get("class"),
        "prompts": _digest(prompts) if prompts else None,
        "guidance": info.get("guidance"),
        "format": fmt,
        "keep_float": keep_float,
        "seeds": seeds.digest(),
        "n": n,
    }
    state_dir = out_dir / ".shards"
    lock = DirectoryLock(out_dir, "sample folder") if rank == 0 else contextlib.nullcontext()
    with lock:
        if rank == 0:
            check_disk_space(out_dir, n, info, want_png, want_npz, keep_float)
            _check_identity(out_dir, state_dir, identity, force)
        barrier()
        blocks = [(a, min(a + SHARD, n)) for a in range(0, n, SHARD)][rank::world]
        todo = [(a, b) for a, b in blocks if not (state_dir / f"{_block_name(a)}.done").is_file()]
        total = sum(b - a for a, b in blocks)
        t0 = time.time()
        with Progress(total, "sampling", "img", enabled=show_progress) as bar, ThreadPoolExecutor(8) as pool:
            bar.start_at(total - sum(b - a for a, b in todo))
            for a, b in todo:
                xs, xfs, ys, index = [], [], [], []
                for c in range(a, b, batch):
                    part = seeds[c : min(c + batch, b)]
                    x, labels = in_chunks(fn, part)
                    x = x.cpu()
                    if is_image:
                        arr = to_uint8(x).permute(0, 2, 3, 1).numpy()
                        if want_png:
                            files = [out_dir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png" for s in part]
                            texts = [prompt_of(s) for s in part] if prompt_of else [None] * len(part)
                            rows = zip(files, arr, texts, strict=True)
                            jobs = [pool.submit(_write_png, p, img, t) for p, img, t in rows]
                            for f in jobs:
                                f.result()
                        if prompt_of:
                            index.extend({"seed": s, "file": f"{s // 1000 * 1000:06d}/{s:06d}.png",
                                          "prompt": prompt_of(s)} for s in part)  # fmt: skip
                    else:
                        arr = x.numpy().astype(np.float32)
                    if want_npz:
                        xs.append(arr)
                        if keep_float:
                            xfs.append(x.float().permute(0, 2, 3, 1).numpy())
                        if labels is not None:
                            ys.append(labels.argmax(1).cpu().numpy())
                    bar.advance(len(part))
                if want_npz:
                    payload = {"x": np.concatenate(xs)}
                    if keep_float:
                        payload["xf"] = np.concatenate(xfs)
                    if ys:
                        payload["y"] = np.concatenate(ys)
                    with atomic_path(state_dir / f"{_block_name(a)}.npz") as tmp, open(tmp, "wb") as f:
                        np.savez(f, **payload)
                if prompt_of:
                    with atomic_path(state_dir / f"{_block_name(a)}.jsonl") as tmp:
                        tmp.write_text("".join(json.dumps(row) + "\n" for row in index))
                atomic_write_json(state_dir / f"{_block_name(a)}.done", {"positions": [a, b]})
        elapsed = time.time() - t0
        generated = sum(b - a for a, b in todo)
        summary = {"images": n, "generated_now": generated, "seconds": elapsed,
                   "images_per_s": generated / elapsed if elapsed > 0 and generated else None}  # fmt: skip
        barrier()
        all_blocks = [(a, min(a + SHARD, n)) for a in range(0, n, SHARD)]
        if rank == 0 and all((state_dir / f"{_block_name(a)}.done").is_file() for a, _ in all_blocks):
            if want_npz:
                summary["npz"] = str(assemble_npz(out_dir, [a for a, _ in all_blocks], keep_float))
            summary["preview"] = _preview(out_dir, seeds, is_image, want_npz)
            if prompt_of:  # one index of every image's seed, file and prompt, in seed-list order
                with atomic_path(out_dir / "index.jsonl") as tmp:
                    tmp.write_text("".join((state_dir / f"{_block_name(a)}.jsonl").read_text() for a, _ in all_blocks))
                summary["index"] = str(out_dir / "index.jsonl")
            atomic_write_json(out_dir / "sampling.json", {**info, "seeds": [seeds[0], seeds[-1]], "n": n})
    return summary


def check_disk_space(out_dir: Path, n: int, info: dict, png: bool, npz: bool, keep_float: bool) -> None:
    """Refuse up front what cannot fit: the npz blocks and the assembled npz hold every image twice
    (uint8, and float32 with keep_float); PNGs are counted at their uncompressed size."""
    import shutil

    size = math.prod(info["img_shape"])
    per_image = (size * (2 if npz else 0) * (1 if info["data"].get("kind") == "image" else 4)
                 + (size if png else 0) + (8 * size if keep_float else 0))  # fmt: skip
    need = n * per_image
    probe = out_dir if out_dir.exists() else out_dir.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(
            f"{out_dir}: {n:,} samples need about {need / 2**30:,.1f} GiB, and {free / 2**30:,.1f} GiB are free there; "
            "free space, sample fewer, or write elsewhere"
        )


PREVIEW_DIR = ".preview"  # hidden, so that no image-folder reader takes a preview for a sample


def _preview(out_dir: Path, seeds: Seeds, is_image: bool, have_npz: bool) -> Path | None:
    if have_npz:
        with np.load(out_dir / "samples.npz", mmap_mode="r") as z:
            x = torch.from_numpy(np.array(z["arr_0"][:4000]))
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


def assemble_npz(out_dir: Path, blocks: list[int], keep_float: bool = False) -> Path:
    """samples.npz from the blocks in order, streamed block by block into the zip (np.load reads it
    as any npz): memory holds one block at a time, whatever the number of samples."""
    import zipfile

    parts = [out_dir / ".shards" / f"{_block_name(a)}.npz" for a in blocks]
    with np.load(parts[0]) as z:
        keys = [k for k in ("x", "y", "xf") if k in z.files and (k != "xf" or keep_float)]
        first = {k: z[k] for k in keys}
    counts = []
    for p in parts:
        with np.load(p, mmap_mode="r") as z:
            counts.append(len(z["x"]))
    total = sum(counts)
    names = {"x": "arr_0", "y": "arr_1", "xf": "arr_float"}
    path = out_dir / "samples.npz"
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in keys:
            header = {"descr": np.lib.format.dtype_to_descr(first[key].dtype), "fortran_order": False,
                      "shape": (total, *first[key].shape[1:])}  # fmt: skip
            with zf.open(f"{names[key]}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for p in parts:
                    with np.load(p) as z:
                        f.write(np.ascontiguousarray(z[key]).tobytes())
    return path
