"""Prompt adherence of a text-conditioned model of a labelled dataset: the share of generated images
that a classifier (an `emdctl evaluate train-features` file) assigns to the class their prompt names.

The prompt -> class map is the teacher's `prompts.json` (class -> phrasings, written beside the
pipeline by `emdctl teacher train` of a teacher-train-text recipe). A sample folder is what `emdctl
sample --prompt/--prompts` writes (index.jsonl pairs each PNG with its prompt). The metric is bounded
by the classifier's own accuracy on real images (reported beside it by train-features), and a sample
set whose prompts are shuffled against its images scores about 1 / (number of classes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import UserError


def prompt_classes(prompts_json: Path) -> dict[str, int]:
    """prompt -> class from a {class: [phrasings]} JSON file."""
    try:
        table = json.loads(Path(prompts_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{prompts_json}: cannot read the prompts by class ({e.__class__.__name__})") from None
    out: dict[str, int] = {}
    for cls, phrasings in table.items():
        for p in phrasings:
            if p in out and out[p] != int(cls):
                raise UserError(f"{prompts_json}: prompt {p!r} names two classes ({out[p]}, {cls})")
            out[p] = int(cls)
    return out


@torch.no_grad()
def adherence(images: torch.Tensor, prompts: list[str], classes: dict[str, int], net, meta, device="cpu") -> dict:
    """images uint8 [N, H, W, C]; the share whose predicted class is their prompt's, overall (with
    its binomial standard error) and per class."""
    from .classifier import _prepare

    unknown = sorted({p for p in prompts if p not in classes})
    if unknown:
        raise UserError(f"prompt {unknown[0]!r} is not in the teacher's prompts by class ({len(unknown)} unknown)")
    want = torch.tensor([classes[p] for p in prompts])
    images = images[..., None] if images.ndim == 3 else images  # [N, H, W] grey images
    preds = []
    net = net.to(device)
    for chunk in images.split(512):
        x = _prepare(chunk.permute(0, 3, 1, 2).to(device), meta["channels"], meta["resolution"])
        preds.append(net(x)[1].argmax(1).cpu())
    hit = (torch.cat(preds) == want).double()
    share = float(hit.mean())
    per = {int(c): float(hit[want == c].mean()) for c in sorted(set(want.tolist()))}
    return {"adherence": share, "adherence_se": math.sqrt(share * (1 - share) / len(hit)), "n": len(hit),
            "per_class": per}  # fmt: skip


def adherence_of_folder(folder: Path, prompts_json: Path, features: Path, device="cpu") -> dict:
    from .classifier import load_feature_net
    from .clip import read_sample_folder

    images, prompts = read_sample_folder(folder)
    net, meta = load_feature_net(features)
    return {**adherence(images, prompts, prompt_classes(prompts_json), net, meta, device), "samples": str(folder),
            "features": str(features)}  # fmt: skip
