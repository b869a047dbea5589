"""The precision policy, in one place.

Networks run under autocast in the policy's dtype (bf16 on GPUs); the preconditioning
coefficients, the Langevin state and ledger, the losses, EMA and optimizer states stay float32.
Channels-last layout, activation checkpointing and torch.compile are switched here too.
"""

from __future__ import annotations

import torch
from torch import nn

from .networks.layers import UNetBlock
from .networks.precond import Denoiser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_backends(tf32: bool) -> None:
    """TF32 matmuls/convolutions on Ampere+ (off by default: EDM's fp32 reference keeps it off)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = torch.cuda.is_available()


def apply_policy(module: nn.Module, dtype: str = "fp32", channels_last: bool = False, checkpointing: bool = False):
    """Set the compute dtype / layout / recomputation of every denoiser and U-Net block inside `module`."""
    for m in module.modules():
        if isinstance(m, Denoiser):
            m.compute_dtype = DTYPES[dtype]
            m.channels_last = channels_last
        if isinstance(m, UNetBlock):
            m.checkpointing = checkpointing
        if checkpointing and getattr(m, "_supports_gradient_checkpointing", False):
            m.enable_gradient_checkpointing()  # a diffusers network: its own per-block recomputation
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def compile_for(module: nn.Module, precision, device) -> nn.Module:
    """The module compiled with torch.compile when `precision.compile` asks and the device is a GPU;
    CPU paths stay plain PyTorch (the one rule every method follows)."""
    if not precision.compile or torch.device(device).type != "cuda":
        return module
    return torch.compile(module)
