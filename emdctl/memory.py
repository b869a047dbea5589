"""A memory estimate printed before a run starts.

EMD holds a teacher, a fake score, a generator, its EMA and two Adam optimizers. Their bytes are
exact; activations are estimated by running the generator's network once on the meta device (no
memory, no compute) and summing the outputs its layers keep for backward, for one micro-batch.
Activation checkpointing keeps only U-Net block inputs; micro-batching bounds the batch in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from .networks import build_denoiser
from .networks.layers import UNetBlock
from .precision import DTYPES

GB = 2**30


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def activation_bytes(config: dict, micro_batch: int, dtype: str = "fp32", checkpointing: bool = False) -> int | None:
    """Bytes of forward outputs kept for backward by one denoiser forward, or None if unknown."""
    try:
        with torch.device("meta"):
            den = build_denoiser(config)
        total = 0
        block_io = 0
        elem = DTYPES[dtype].itemsize

        def hook(mod, inp, out):
            nonlocal total, block_io
            if isinstance(out, torch.Tensor):
                n = out.numel() * elem
                if isinstance(mod, UNetBlock):
                    block_io += n
                elif not list(mod.children()):
                    total += n

        handles = [m.register_forward_hook(hook) for m in den.modules()]
        x = torch.zeros((micro_batch, *den.img_shape), device="meta")
        sigma = torch.ones(micro_batch, device="meta")
        labels = torch.zeros(micro_batch, den.label_dim, device="meta") if den.label_dim else None
        with torch.no_grad():
            den(x, sigma, labels)
        for h in handles:
            h.remove()
        # Each leaf output is kept about twice (its input to the next layer and activation saves).
        return 2 * block_io if checkpointing else 2 * total
    except Exception:  # noqa: BLE001 - an estimate: never let it stop a run
        return None


def describe(method, recipe) -> str:
    mods = method.modules()
    static = sum(parameter_bytes(m) for m in mods.values())
    teacher = getattr(method, "teacher", None)
    if teacher is not None:
        static += parameter_bytes(teacher)
    trainable = sum(p.numel() for opt in method.optimizers().values() for g in opt.param_groups for p in g["params"])
    static += trainable * 4 * 3  # gradients + Adam's two moments, float32
    cfg = None
    if "generator" in mods and hasattr(mods["generator"], "denoiser"):
        cfg = mods["generator"].denoiser.config()
    elif "net" in mods and hasattr(mods["net"], "config"):
        cfg = mods["net"].config()
    act = None
    if cfg is not None:
        act = activation_bytes(cfg, method.batching.micro, recipe.precision.dtype, recipe.precision.checkpointing)
        # Methods whose generator step backpropagates through the teacher and the fake score
        # (SiD, SiDA) hold several networks' activations at once.
        act = act and act * getattr(method, "networks_in_backward", 1)
    where = "GPU" if method.device.type == "cuda" else "host"
    text = f"{where} memory estimate: networks + optimizer states {static / GB:.2f} GB"
    if act is not None:
        text += f", activations ~{act / GB:.2f} GB per micro-batch of {method.batching.micro}"
        text += f" (total ~{(static + act) / GB:.2f} GB)"
    if method.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(method.device)
        text += f"; device has {total / GB:.0f} GB"
        if act is not None and static + act > 0.95 * total:
            text += " [bold red]- likely out of memory: lower batch.micro or set precision.checkpointing[/]"
    return text


def available_bytes(device: torch.device) -> int | None:
    """Memory a run can still take: the GPU's free memory, or the host's MemAvailable."""
    from .storage import host_memory_available

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_memory_available()


def parameters_on_meta(config: dict) -> int | None:
    """Parameters of the network a config describes, built on the meta device (no memory); None
    when the architecture cannot be built there."""
    from .networks import build_on_meta

    den = build_on_meta(config)
    return None if den is None else sum(p.numel() for p in den.parameters())


def check_fits(
    config: dict, copies: int, micro_batch: int, dtype: str, checkpointing: bool, device, what: str, activations=1
) -> None:
    """Refuse, before anything is allocated, a run whose networks (`copies` float32 copies' worth:
    networks, EMA, gradients, Adam moments) and one micro-batch's activations (of `activations`
    networks in one backward) cannot fit in what the device has free. Only a clear miss is refused
    (an estimate: the real need may be a little higher)."""
    from .errors import UserError

    try:
        params = parameters_on_meta(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{what}: the network it describes cannot be built ({str(e)[:120]})") from None
    if params is None:
        return  # not buildable on the meta device: no estimate (such networks are small and fixed)
    act = (activation_bytes(config, micro_batch, dtype, checkpointing) or 0) * activations
    need = params * 4 * copies + act
    free = available_bytes(torch.device(device))
    if free is not None and need > free:
        raise UserError(
            f"{what}: {params:,} parameters per network and one micro-batch of {micro_batch} need about "
            f"{need / GB:,.1f} GB, and the {'GPU' if torch.device(device).type == 'cuda' else 'host'} has "
            f"{free / GB:,.1f} GB free; use smaller networks or batch.micro"
        )
