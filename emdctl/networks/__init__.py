"""Networks (architectures) and their construction from plain-data configs.

A denoiser config is a JSON-able dict:
    {"precond": "edm", "precond_kwargs": {...}, "img_shape": [3, 32, 32], "label_dim": 10,
     "arch": "songunet", "arch_kwargs": {...}}
It is what `config.json` holds next to `model.safetensors` in an emdctl model directory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import diffusers_nets
from .dhariwal import DhariwalUNet
from .mlp import MLP
from .precond import PRECONDS, Denoiser
from .pulfer_unet import PulferUNet
from .songunet import SongUNet

ARCHS = {"songunet": SongUNet, "dhariwalunet": DhariwalUNet, "mlp": MLP, "pulfer-unet": PulferUNet}

# Presets with NVlabs/edm's names for its configurations (train.py --arch).
PRESETS: dict[str, tuple[str, dict]] = {
    "ddpmpp": (
        "songunet",
        dict(
            model_channels=128,
            channel_mult=[2, 2, 2],
            embedding_type="positional",
            encoder_type="standard",
            decoder_type="standard",
            channel_mult_noise=1,
            resample_filter=[1, 1],
            dropout=0.13,
        ),
    ),
    "ncsnpp": (
        "songunet",
        dict(
            model_channels=128,
            channel_mult=[2, 2, 2],
            embedding_type="fourier",
            encoder_type="residual",
            decoder_type="standard",
            channel_mult_noise=2,
            resample_filter=[1, 3, 3, 1],
            dropout=0.13,
        ),
    ),
    "adm": ("dhariwalunet", dict(model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10)),
    "mlp": ("mlp", dict(hidden=256, layers=4, emb_dim=64)),
    "pulfer-unet": ("pulfer-unet", dict(n_steps=1000, time_emb_dim=100)),
}


def build_network(
    arch: str, img_shape, label_dim: int, arch_kwargs: dict, out_channels: int | None = None
) -> nn.Module:
    if arch in diffusers_nets.ARCHS:  # the model's own config; conditioning width from arch_kwargs.cond
        return diffusers_nets.ARCHS[arch](**copy.deepcopy(arch_kwargs))
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join([*ARCHS, *diffusers_nets.ARCHS])})")
    kw = copy.deepcopy(arch_kwargs)
    if arch in ("songunet", "dhariwalunet"):
        c, h, w = img_shape
        if h != w:
            raise ValueError(f"{arch} needs square images, got {h}x{w}")
        return ARCHS[arch](img_resolution=h, in_channels=c, out_channels=out_channels or c, label_dim=label_dim, **kw)
    if arch == "mlp":
        (d,) = img_shape
        return MLP(d, label_dim=label_dim, **kw)
    if arch == "pulfer-unet":
        if tuple(img_shape) != (1, 28, 28) or label_dim:
            raise ValueError("pulfer-unet is an unconditional 1x28x28 network")
        return PulferUNet(**kw)
    raise AssertionError(arch)


def build_denoiser(config: dict) -> Denoiser:
    """Construct a denoiser (fresh weights) from its plain-data config."""
    config = copy.deepcopy(config)
    precond = config["precond"]
    preconds = {**PRECONDS, **diffusers_nets.PRECONDS}
    if precond not in preconds:
        raise ValueError(f"unknown preconditioning {precond!r} (known: {', '.join(preconds)})")
    img_shape = tuple(config["img_shape"])
    label_dim = int(config.get("label_dim", 0))
    pk = dict(config.get("precond_kwargs", {}))
    if precond == "edm" and pk.get("sigma_max", 0) is None:
        pk.pop("sigma_max")
    out_channels = img_shape[0] * 2 if precond == "iddpm" else None
    net = build_network(config["arch"], img_shape, label_dim, config.get("arch_kwargs", {}), out_channels)
    den = preconds[precond](net, img_shape, label_dim, **pk)
    den.arch = {"arch": config["arch"], "arch_kwargs": config.get("arch_kwargs", {})}
    return den


def build_on_meta(config: dict) -> Denoiser | None:
    """The network a config describes, on the meta device (shapes, no memory); None for an
    architecture whose constructor computes with its tensors, which meta tensors cannot do."""
    try:
        with torch.device("meta"):
            return build_denoiser(config)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" in str(e):
            return None
        raise


def check_config_fits_weights(config: dict, state: dict, source: str) -> None:
    """A config.json that does not describe the weights beside it (it is outside their checksum) is
    refused before a network is allocated: built on the meta device, its values must number the
    weights'. (A hand-edited width of 1e9 would otherwise allocate until the machine runs out.)"""
    from ..errors import UserError

    try:
        den = build_on_meta(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: config.json does not describe a buildable network ({str(e)[:120]})") from None
    if den is None:
        return  # an architecture that computes while it is built (the MNIST DDPM's U-Net): no check
    want = sum(v.numel() for v in den.state_dict().values())
    have = sum(v.numel() for v in state.values())
    if want != have:
        raise UserError(
            f"{source}: config.json describes a network of {want:,} values but the weights hold {have:,}; "
            "they do not belong together (re-export or re-convert it)"
        )


def preset_config(preset: str, precond: str, img_shape, label_dim: int, overrides: dict, sigma_data=0.5) -> dict:
    arch, kwargs = PRESETS[preset]
    pk = {"sigma_data": sigma_data} if precond == "edm" else {}
    return {
        "precond": precond,
        "precond_kwargs": pk,
        "img_shape": list(img_shape),
        "label_dim": label_dim,
        "arch": arch,
        "arch_kwargs": {**copy.deepcopy(kwargs), **overrides},
    }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ARCHS", "PRESETS", "Denoiser", "build_denoiser", "build_network", "count_parameters", "preset_config"]
