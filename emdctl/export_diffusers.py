"""`emdctl export --format diffusers`: a student of a diffusers teacher as a diffusers pipeline
directory, so that

    DiffusionPipeline.from_pretrained(DIR)(prompt, num_inference_steps=1, guidance_scale=0,
                                           generator=torch.Generator().manual_seed(seed))

gives the image `emdctl sample RUN --prompt PROMPT --seeds SEED` gives. The pipeline is the
teacher's (its VAE, text encoders, tokenizers and model_index.json, copied) with the student's
network (LoRA adapters merged in) and an EulerDiscreteScheduler with the teacher's noise schedule
and trailing timesteps: its one step starts from sigma_max z at the last training timestep and
returns the network's x0 estimate, which is the generator g(z) = D(sigma* z; sigma*) exactly when
sigma* is the teacher's largest sigma (the default of the diffusers recipes). `lora_file`: the
adapters alone as well, as pytorch_lora_weights.safetensors (diffusers' `load_lora_weights` format),
to apply to the teacher's own pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .networks.diffusers_nets import DiffusersUNet, lora_state, merged_state, require_diffusers
from .storage import atomic_write_json

COPIED = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def export_diffusers(gen, cfg: dict, out: Path, lora_file: bool = False) -> dict:
    require_diffusers()
    import diffusers

    data = cfg.get("data", {})
    root = Path(data.get("pipeline") or "")
    net = gen.denoiser.network
    if not isinstance(net, DiffusersUNet) or not data.get("pipeline"):
        raise UserError(
            "--format diffusers: only students of diffusers UNet teachers (SD 1.x/2.x, SDXL) export as a "
            "pipeline; flow transformers (SD3) are not supported yet: use --format safetensors"
        )
    if not (root / "model_index.json").is_file():
        raise UserError(
            f"{root}: the teacher's pipeline directory is gone; the export copies its VAE and text encoders"
        )
    if gen.steps != 1:
        raise UserError("--format diffusers: few-step students are not supported yet (one-step only)")
    grid_max = float(gen.denoiser.grid[-1])
    if abs(gen.sigma_star - grid_max) > 1e-6 * grid_max:
        raise UserError(
            f"--format diffusers: the generator runs at sigma* = {gen.sigma_star:g}; a diffusers one-step "
            f"pipeline starts at the teacher's largest sigma {grid_max:g} (set generator.sigma_init: {grid_max:g})"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; give a new folder for the pipeline")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (root / name).is_dir():
            shutil.copytree(root / name, out / name)
    index = json.loads((root / "model_index.json").read_text())
    unet = diffusers.UNet2DConditionModel.from_config(dict(net.model.config))
    unet.load_state_dict(merged_state(net), strict=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    pk = gen.denoiser.precond_kwargs()
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=pk["num_train_timesteps"],
        beta_start=pk["beta_start"],
        beta_end=pk["beta_end"],
        beta_schedule=pk["beta_schedule"],
        prediction_type=pk["prediction_type"],
        timestep_spacing="trailing",
        steps_offset=1,
    )
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    atomic_write_json(out / "model_index.json", index)
    result = {"path": str(out)}
    if lora_file:
        if not net.lora:
            raise UserError("--lora: this generator has no LoRA adapters (generator.lora in its recipe)")
        from diffusers import StableDiffusionPipeline

        # diffusers' own writer (keys "unet.*", the adapter's rank and alpha in the file's metadata).
        meta = {"r": int(net.lora["rank"]), "lora_alpha": float(net.lora["alpha"]),
                "target_modules": list(net.lora["targets"])}  # fmt: skip
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=lora_state(net), unet_lora_adapter_metadata=meta, safe_serialization=True
        )
        result["lora"] = str(out / "pytorch_lora_weights.safetensors")
    return result


@torch.no_grad()
def pipeline_image(directory: Path, prompt: str, seed: int):
    """One image of an exported pipeline, as its users make it (float [0, 1], HWC)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(directory, use_safetensors=True)
    out = pipe(
        prompt, num_inference_steps=1, guidance_scale=0, output_type="np", generator=torch.Generator().manual_seed(seed)
    )
    return out.images[0]
