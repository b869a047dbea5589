"""CLIP score of generated images against their prompts: 100 * max(cos(E_image, E_text), 0),
averaged over images (the definition torchmetrics and the one-step text-to-image papers use).

The images are a sample folder written by `emdctl sample --prompt/--prompts` (its index.jsonl
pairs every PNG with its prompt). The CLIP model is a transformers CLIPModel directory (weights,
config, tokenizer), or a Hugging Face id from the local cache; nothing is downloaded at evaluation
time unless the hub is reachable, and offline the error says what to fetch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the normalization CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_model(name: str | Path, device):
    """(model, tokenizer) of a CLIPModel directory or a cached hub id; safetensors only."""
    try:
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError:
        raise UserError("evaluate clip needs transformers: pip install 'emdctl[diffusers]'") from None
    local = Path(name).is_dir()
    try:
        model = CLIPModel.from_pretrained(str(name), use_safetensors=True, local_files_only=not local and _offline())
        tokenizer = CLIPTokenizer.from_pretrained(str(name), local_files_only=not local and _offline())
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise UserError(
            f"--clip {name}: cannot load a CLIP model ({reason}); give a local directory holding a transformers "
            "CLIPModel (model.safetensors, config.json, tokenizer files), e.g. fetched on a machine with internet by "
            "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`"
        ) from None
    return model.to(device).eval(), tokenizer


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> CLIP's input: bicubic resize of the short side to `size`, center crop,
    [0, 1], normalized by CLIP's mean and std."""
    x = images.permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                        mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)  # fmt: skip
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_scores(
    model, tokenizer, images: torch.Tensor, prompts: list[str], device, batch: int = 64, clamp: bool = True
) -> torch.Tensor:
    """Per-image 100 * max(cos(image, prompt), 0) for uint8 images [N, H, W, 3] and their prompts
    (clamp False: 100 * cos itself)."""
    if len(images) != len(prompts):
        raise ValueError("one prompt per image")
    size = model.config.vision_config.image_size
    out = []
    for i in range(0, len(prompts), batch):
        pix = preprocess(images[i : i + batch], size).to(device)
        tok = tokenizer(prompts[i : i + batch], padding=True, truncation=True, return_tensors="pt").to(device)
        img = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pix)), dim=-1)
        txt = torch.nn.functional.normalize(_features(model.get_text_features(**tok)), dim=-1)
        cos = (img * txt).sum(-1)
        out.append(100 * (cos.clamp_min(0) if clamp else cos).float().cpu())
    return torch.cat(out)


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooled embedding is the projected feature
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def read_sample_folder(folder: Path, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 images [N, H, W, 3] and their prompts, from the index.jsonl of `emdctl sample`."""
    index = Path(folder) / "index.jsonl"
    if not index.is_file():
        raise UserError(
            f"{folder}: no index.jsonl; CLIP scores need samples written by `emdctl sample --prompt/--prompts`"
        )
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise UserError(f"{index}: lists no images")
    images, prompts = [], []
    for row in rows:
        path = Path(folder) / row["file"]
        if not path.is_file():
            raise UserError(f"{path}: listed in {index} but missing; re-run the sampling (it resumes)")
        images.append(np.asarray(Image.open(path).convert("RGB")))
        prompts.append(row["prompt"])
    return torch.from_numpy(np.stack(images)), prompts
