"""Tiny random diffusers pipelines, built and saved by the tests themselves (never downloaded):
a tokenizer whose vocabulary is written here, CLIP text encoders of width 16, a two-level UNet or
an SD3 transformer with a few channels, and a small AutoencoderKL."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = list(string.ascii_lowercase + string.digits + ",.")
MAX_TOKENS = 12


def write_tokenizer_files(d: Path) -> tuple[Path, Path]:
    """A character-level CLIP BPE vocabulary (no merges): every word is split into its letters."""
    from emdctl.methods.text_teacher_training import write_char_vocab

    write_char_vocab(d, "".join(CHARS))
    return d / "vocab.json", d / "merges.txt"


def tokenizer(d: Path):
    from transformers import CLIPTokenizer

    vocab, merges = write_tokenizer_files(d)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_TOKENS)


def text_encoder(projection: bool = False, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def unet(in_channels=4, size=8, cross=16, sdxl=False):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4
        )
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=4,
        norm_num_groups=4,
        **extra,
    )


def build_sd(d: Path, prediction_type="epsilon", seed=0, latent=True, scheduler="euler") -> Path:
    """A tiny StableDiffusionPipeline (latent, 16 px images, 4x8x8 latents; or pixel space, 3x8x8)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    cls = EulerDiscreteScheduler if scheduler == "euler" else DDPMScheduler
    sched = cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        **({"timestep_spacing": "trailing"} if scheduler == "euler" else {}),
    )
    pipe = StableDiffusionPipeline(
        vae=vae() if latent else None,
        text_encoder=text_encoder(),
        tokenizer=tokenizer(d / "tok-src"),
        unet=unet(4 if latent else 3),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def build_sdxl(d: Path, seed=0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(hidden=8),
        text_encoder_2=text_encoder(True, 8),
        tokenizer=tokenizer(d / "tok-src"),
        tokenizer_2=tokenizer(d / "tok-src2"),
        unet=unet(sdxl=True),
        scheduler=sched,
    )
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def build_sd3(d: Path, seed=0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=text_encoder(True),
        tokenizer=tokenizer(d / "tok-src"),
        text_encoder_2=text_encoder(True),
        tokenizer_2=tokenizer(d / "tok-src2"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(d, safe_serialization=True)
    return d


PROMPTS = ["a handwritten digit seven", "the number 3, thin strokes", "a red square", "two cats"]


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def recipe(pipe: Path, prompts: Path | None, method="emd", **extra) -> dict:
    """A small distillation recipe for a tiny pipeline."""
    m = {"name": method}
    if method == "emd":
        m["langevin"] = {"steps": 2}
    r = {
        "kind": "distill",
        "name": "tiny-sd",
        "device": "cpu",
        "seed": 1,
        "duration": 16,
        "batch": {"size": 4},
        "teacher": {"kind": "diffusers", "path": str(pipe)},
        "generator": {"sigma_init": 14.6},
        "method": m,
        "logging": {"every": 8, "grid_every": 16, "grid_size": 4, "progress": False},
        "checkpoint": {"every": 8, "keep": 2},
    }
    if prompts is not None:
        r["data"] = {"prompts": str(prompts)}
    for k, v in extra.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def build_clip(d: Path, seed=0) -> Path:
    """A tiny transformers CLIPModel with its tokenizer, saved as a directory (for `evaluate clip`)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {
        "vocab_size": 2 + 2 * len(CHARS),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
    }
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(d)
    tokenizer(d / "tok-src").save_pretrained(d)
    return d
