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
# The units diffusers networks recompute under gradient checkpointing (their inputs are kept).
CHECKPOINTED_BLOCKS = {"ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "JointTransformerBlock"}


def parameter_bytes(module: nn.Module, seen: set | None = None) -> int:
    """Bytes of a module's parameters and buffers; with `seen`, a tensor shared with a module
    counted before (a LoRA student's frozen base) is not counted again."""
    seen = set() if seen is None else seen
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta" and t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


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
            # (a diffusers block may return a tuple of tensors)
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
            if outs:
                n = sum(o.numel() for o in outs) * elem
                if isinstance(mod, UNetBlock) or type(mod).__name__ in CHECKPOINTED_BLOCKS:
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
    seen: set = set()
    teacher = getattr(method, "teacher", None)
    static = parameter_bytes(teacher, seen) if teacher is not None else 0
    static += sum(parameter_bytes(m, seen) for m in mods.values())
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


def recipe_estimate(recipe) -> str | None:
    """The memory a distillation recipe will need, from its teacher's network config alone (no
    weights loaded): said by `emdctl recipe show`. Diffusers teachers only for now (the config is
    on disk, in the Hugging Face cache, or in emdctl's table of official pipelines); None otherwise."""
    if recipe.kind != "distill" or recipe.teacher.kind != "diffusers":
        return None
    from .methods import DISTILLATION_METHODS
    from .teachers.diffusers_pipeline import offline_denoiser_config

    found = offline_denoiser_config(recipe.teacher)
    if found is None:
        return None
    config, where = found
    params = parameters_on_meta(config) or 0
    loras = {"generator": recipe.generator.lora, "fake": recipe.fake_score.lora}
    adapters = {name: _lora_parameters(config, lora) for name, lora in loras.items() if lora is not None}
    # fp32 weights: the teacher; the generator, its EMA and the fake score (their frozen bases are the
    # teacher's when they carry LoRA adapters); gradients and two Adam moments of what is trained.
    static = params
    for name, copies in (("generator", 2), ("fake", 1)):  # (the generator's EMA is its second copy)
        trained = adapters.get(name, params)
        static += trained * copies + trained * 3  # the copies (adapters alone for LoRA), gradient, two moments
    static *= 4
    prec, micro = recipe.precision, recipe.batch.micro or recipe.batch.size
    act = activation_bytes(config, micro, prec.dtype, prec.checkpointing) or 0
    act *= getattr(DISTILLATION_METHODS[recipe.method.name], "networks_in_backward", 1)
    how = prec.dtype + (", checkpointed" if prec.checkpointing else "")
    text = (
        f"memory estimate: {params / 1e6:,.0f}M parameters per network ({where}); networks + optimizer states "
        f"{static / GB:.1f} GB, activations ~{act / GB:.1f} GB per micro-batch of {micro} ({how}); "
        f"total ~{(static + act) / GB:.1f} GB per device"
    )
    if recipe.data is not None and recipe.data.prompts.is_file():
        from .conditioning import read_prompts

        table = len(read_prompts(recipe.data.prompts)) * config["label_dim"] * 4
        text += f"; prompt embeddings {table / GB:.2f} GB in host memory"
    return text


def _lora_parameters(config: dict, lora) -> int:
    """Parameters of LoRA adapters of rank r on the linear layers named by `lora.targets`: r (in + out) each."""
    try:
        with torch.device("meta"):
            den = build_denoiser(config)
    except Exception:  # noqa: BLE001 - an estimate
        return 0
    total = 0
    for name, mod in den.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in lora.targets):
            total += lora.rank * (mod.in_features + mod.out_features)
    return total
