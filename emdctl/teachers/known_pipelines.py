"""The network configs of the official pipelines the recipes name, so that `emdctl recipe show`
can estimate memory offline, before anything is downloaded (values: the network config.json of
each model id on the Hugging Face Hub; only the fields that differ from diffusers' defaults).
`cond` is the prompt-embedding layout the pipeline's encode_prompt gives."""

from __future__ import annotations

_SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
_SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip
_SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}  # fmt: skip

_SD15 = {"class": "UNet2DConditionModel", "config": _SD15_UNET, "cond": {"seq_len": 77, "dim": 768, "pooled": 0},
         "vae_factor": 8, "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}}  # fmt: skip
KNOWN = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "class": "UNet2DConditionModel", "config": _SDXL_UNET, "cond": {"seq_len": 77, "dim": 2048, "pooled": 1280},
        "vae_factor": 8, "scheduler": _SD15["scheduler"]},
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "class": "SD3Transformer2DModel", "config": _SD3_MEDIUM, "cond": {"seq_len": 333, "dim": 4096, "pooled": 2048},
        "vae_factor": 8, "scheduler": {"num_train_timesteps": 1000}},
}  # fmt: skip
