"""Pixel statistics of image sets (`emdctl evaluate stats`): brightness, contrast, and the fraction
of degenerate flat images (per-image pixel standard deviation below 10 grey levels).

The MNIST teacher in shared/data produces mostly flat black or white squares, so the fraction is
reported next to feature distances: it shows whether a student reproduces the teacher's flaw.

That teacher's score cannot see an image's mean level (a LayerNorm over the whole image), so its
samples carry an arbitrary brightness offset (its 1000-step samples: per-image means from -16 to
+9 in [-1, 1] units) that clipping turns into flat squares. `shift_background` maps every image to
one representative of its class under that symmetry, the one whose median pixel is black, so that
such a teacher and its students can be compared on what the teacher does define.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import open_dataset
from ..errors import UserError

FLAT_STD = 10.0  # grey levels


def shift_background(x: torch.Tensor) -> torch.Tensor:
    """Shift each image's level so that its median pixel is black: -1 for float images in [-1, 1]
    units (shifted before clipping), 0 for uint8. Images with a black background, like MNIST's,
    are left as they are; the result does not depend on an offset added to the input image."""
    median = x.flatten(1).median(1).values.view(-1, *[1] * (x.ndim - 1))
    if x.dtype == torch.uint8:
        return (x.int() - median.int()).clamp(0, 255).to(torch.uint8)
    return x - median - 1.0


def pixel_statistics(x_uint8: torch.Tensor) -> dict:
    x = x_uint8.double()
    per_std = x.flatten(1).std(1)
    per_mean = x.flatten(1).mean(1)
    flat = per_std < FLAT_STD
    return {
        "images": int(len(x)),
        "mean_brightness": float(per_mean.mean()),
        "mean_contrast": float(per_std.mean()),
        # The three flat kinds partition flat_fraction (by mean grey level: < 85, 85-170, > 170).
        "flat_fraction": float(flat.double().mean()),
        "flat_black_fraction": float((flat & (per_mean < 85)).double().mean()),
        "flat_grey_fraction": float((flat & (per_mean >= 85) & (per_mean <= 170)).double().mean()),
        "flat_white_fraction": float((flat & (per_mean > 170)).double().mean()),
        "dark_pixel_fraction": float((x < 32).double().mean()),
    }


def images_of(
    source: Path, n: int, batch: int = 256, device="cpu", use_ema: bool = True, seeds=None, shift: bool = False
) -> torch.Tensor:
    """uint8 [N, C, H, W] from a dataset/npz/folder, or made in memory by a generator (like `sample`).
    shift: `shift_background` every image, before clipping where the floats exist (generators, and
    npz files written by `emdctl sample --keep-float`)."""
    import numpy as np

    from ..plots import to_uint8
    from ..sampling import generator_sampler, in_chunks, open_generator
    from .fidelity import source_kind

    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such generator, run directory or dataset")
    level = shift_background if shift else (lambda x: x)
    if source_kind(source) == "generator":
        gen, _ = open_generator(source, use_ema)
        gen = gen.to(device)
        if len(gen.img_shape) != 3:
            raise UserError(f"{source}: not an image generator")
        seeds = seeds or list(range(n))
        fn = generator_sampler(gen, None, None, device)

        def make(part):
            x, _ = fn(part)
            if x.dtype == torch.uint8 and shift:
                raise UserError(f"{source}: an ONNX/TorchScript export returns quantized images; shift its run instead")
            return to_uint8(level(x) if x.dtype != torch.uint8 else x).cpu(), None

        with torch.no_grad():
            return torch.cat([in_chunks(make, seeds[i : i + batch])[0] for i in range(0, len(seeds), batch)])
    if shift and source.suffix == ".npz":
        with np.load(source) as z:
            if "arr_float" in z:
                x = torch.from_numpy(z["arr_float"][:n]).permute(0, 3, 1, 2)
                return to_uint8(level(x))
    ds = open_dataset(source, use_labels=False)
    idx = range(min(n, len(ds)))
    return level(torch.stack([ds[i][0] for i in idx]))


def statistics_table(named: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {name: pixel_statistics(x) for name, x in named.items()}


def as_rows(stats: dict[str, dict]) -> list[list[str]]:
    keys = [
        "images",
        "mean_brightness",
        "mean_contrast",
        "flat_fraction",
        "flat_black_fraction",
        "flat_grey_fraction",
        "flat_white_fraction",
        "dark_pixel_fraction",
    ]
    return [[k] + [f"{s[k]:.4g}" if isinstance(s[k], float) else str(s[k]) for s in stats.values()] for k in keys]
