"""diffusers networks (UNet2DConditionModel, SD3Transformer2DModel) as emdctl architectures, and
the two noise parametrizations of diffusers teachers as EDM-form preconditioners.

The architecture is diffusers' own class built from the model's config.json (kept verbatim in
the denoiser config as arch_kwargs.config), so a student is the teacher's network, saved and loaded
like any emdctl model and handed back to diffusers unchanged by `emdctl export --format diffusers`.

Conditioning travels through emdctl as one flat vector per sample (the `labels` of class-conditional
models): the text encoder's hidden states (seq_len x dim), then the pooled embedding when the model
takes one (SDXL, SD3). `cond` in arch_kwargs says how to cut it; SDXL's added time ids (original
size, crop, target size) are a constant of the resolution, kept in arch_kwargs too.

Needs the optional extra: pip install 'emdctl[diffusers]'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import diffusion
from ..errors import UserError
from .precond import Denoiser, _GridMixin

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def require_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise UserError(
            "diffusers teachers need the optional extra: pip install 'emdctl[diffusers]' "
            "(diffusers, transformers, peft)"
        ) from None
    # Their notices (outdated scheduler fields, truncated prompts: emdctl says that itself) are not ours to print.
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def cond_width(cond: dict) -> int:
    return int(cond["seq_len"]) * int(cond["dim"]) + int(cond.get("pooled", 0))


class _DiffusersNet(nn.Module):
    """The diffusers model inside a denoiser: `model`, built from its config; LoRA adapters (peft)
    on `lora["targets"]` when asked, with the base weights frozen."""

    model_class: str

    def __init__(self, config: dict, cond: dict, lora: dict | None = None, time_ids: list | None = None, model=None):
        super().__init__()
        require_diffusers()
        import diffusers

        self.cond = {k: int(v) for k, v in cond.items()}
        # `model`: an already loaded instance (the teacher's, from its pipeline); else built from config.
        self.model = model if model is not None else getattr(diffusers, self.model_class).from_config(dict(config))
        self.register_buffer(
            "time_ids", torch.tensor(time_ids, dtype=torch.float32) if time_ids else None, persistent=False
        )
        self.lora = dict(lora) if lora else None
        if self.lora:
            add_lora(self.model, self.lora)

    def split(self, labels: torch.Tensor):
        n, length, dim = labels.shape[0], self.cond["seq_len"], self.cond["dim"]
        hidden = labels[:, : length * dim].reshape(n, length, dim)
        pooled = labels[:, length * dim :] if self.cond.get("pooled") else None
        return hidden, pooled


class DiffusersUNet(_DiffusersNet):
    model_class = "UNet2DConditionModel"

    def forward(self, x, timestep, labels):
        hidden, pooled = self.split(labels)
        added = None
        if pooled is not None:  # SDXL's "text_time" embedding
            added = {"text_embeds": pooled, "time_ids": self.time_ids.to(x.dtype).expand(x.shape[0], -1)}
        return self.model(
            x, timestep, encoder_hidden_states=hidden.to(x.dtype), added_cond_kwargs=added, return_dict=False
        )[0]


class DiffusersSD3(_DiffusersNet):
    model_class = "SD3Transformer2DModel"

    def forward(self, x, timestep, labels):
        hidden, pooled = self.split(labels)
        return self.model(
            hidden_states=x,
            encoder_hidden_states=hidden.to(x.dtype),
            pooled_projections=pooled.to(x.dtype),
            timestep=timestep,
            return_dict=False,
        )[0]


ARCHS = {"diffusers-unet": DiffusersUNet, "diffusers-sd3": DiffusersSD3}


def add_lora(model: nn.Module, lora: dict) -> None:
    """LoRA adapters (peft) on the named linear layers of every attention block; everything else frozen.
    B starts at zero, so a fresh adapter leaves the network's function unchanged."""
    from peft import LoraConfig

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # A's random start: a function of the recipe, not of the process
        torch.manual_seed(int(lora.get("seed", 0)))
        model.add_adapter(LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                                     target_modules=list(lora["targets"]), init_lora_weights=True))  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def with_lora_keys(own: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state for a module carrying LoRA adapters made from weights without them (the teacher's):
    each base tensor under peft's `.base_layer.` name, the adapters at their own current values.
    Unchanged when the module has no adapters."""
    if not any(".lora_" in k for k in own):
        return base
    out = {}
    for k, v in own.items():
        if ".lora_" in k:
            out[k] = v
        elif k in base:
            out[k] = base[k]
        elif k.replace(".base_layer.", ".") in base:
            out[k] = base[k.replace(".base_layer.", ".")]
    return out


def share_frozen_base(target: nn.Module, source: nn.Module) -> int:
    """Point every frozen base weight of a LoRA student (`target`) at the same tensor of the frozen
    teacher (`source`, the same architecture without adapters), so that teacher, generator, its EMA
    and the fake score hold one copy of the base between them. Safe because nothing writes to a
    frozen base (loading a checkpoint writes the same values). Returns the number of tensors shared."""
    if not any(".lora_" in k for k, _ in target.named_parameters()):
        return 0
    own = dict(source.named_parameters())
    shared = 0
    for name, p in list(target.named_parameters()):
        src = own.get(name.replace(".base_layer.", "."))
        if p.requires_grad or src is None or src.shape != p.shape or src is p:
            continue
        parent = target.get_submodule(name.rsplit(".", 1)[0])
        parent._parameters[name.rsplit(".", 1)[1]] = src
        shared += 1
    return shared


def merged_state(net: _DiffusersNet) -> dict[str, torch.Tensor]:
    """The diffusers model's weights with every LoRA adapter merged in (W + alpha/r B A), under the
    names of the plain model: what a diffusers UNet/transformer without adapters loads."""
    state = {k: v.detach() for k, v in net.model.state_dict().items()}
    if not net.lora:
        return state
    scale = float(net.lora["alpha"]) / int(net.lora["rank"])
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k and k.endswith(".weight"):
            prefix = k[: k.index(".base_layer.")]
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            v = v + scale * (b.double() @ a.double()).to(v.dtype)
        out[k.replace(".base_layer.", ".")] = v
    return out


def lora_state(net: _DiffusersNet) -> dict[str, torch.Tensor]:
    """The adapters alone, under peft's names without the adapter name (as diffusers' LoRA files are)."""
    return {k.replace(".default", ""): v.detach() for k, v in net.model.state_dict().items() if ".lora_" in k}


class DiffusersVPPrecond(_GridMixin, Denoiser):
    """A discrete-time diffusers UNet (SD 1.x/2.x, SDXL): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n at
    integer t, predicting epsilon, v or the sample. In EDM coordinates x = x_t / sqrt(ab_t) and
    sigma_t = sqrt((1 - ab_t) / ab_t), sigma rounded to the model's grid; with c_in = sqrt(ab_t):
        epsilon: D = x - sigma eps;   v: D = c_in^2 x - sigma c_in v;   sample: D = F.
    ab_t is computed as diffusers computes it (float32), so the grid is the scheduler's own."""

    precond = "diffusers-vp"

    def __init__(
        self,
        network,
        img_shape,
        label_dim=0,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        sigma_data=1.0,
    ):
        alpha_bar = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        grid = diffusion.vp_sigma_from_alpha_bar(alpha_bar)
        super().__init__(img_shape, label_dim, float(grid[0]), float(grid[-1]), sigma_data)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")
        self.network = network
        self.kw = {
            "num_train_timesteps": int(num_train_timesteps),
            "beta_start": float(beta_start),
            "beta_end": float(beta_end),
            "beta_schedule": beta_schedule,
            "prediction_type": prediction_type,
            "sigma_data": float(sigma_data),
        }
        self.grid = grid

    def precond_kwargs(self):
        return dict(self.kw)

    def _denoise(self, x, sigma, labels):
        t = self.grid_index(sigma)
        c_in = 1 / (sigma**2 + 1).sqrt()
        out = self._run(self.network, self._bcast(c_in, x) * x, t, labels)
        kind = self.kw["prediction_type"]
        if kind == "epsilon":
            return x - self._bcast(sigma, x) * out
        if kind == "v_prediction":
            return self._bcast(c_in.square(), x) * x - self._bcast(sigma * c_in, x) * out
        return out


class FlowPrecond(Denoiser):
    """A rectified-flow model (SD3-class, FlowMatchEulerDiscreteScheduler): x_t = (1 - t) x0 + t n,
    predicting v = n - x0 at timestep 1000 t. In EDM coordinates x = x_t / (1 - t), sigma = t / (1 - t):
        t = sigma / (1 + sigma),  x_t = x / (1 + sigma),  D = x_t - t v.
    Continuous in sigma; the range is that of t in [1 / T, 1 - 1 / T]."""

    precond = "flow"

    def __init__(self, network, img_shape, label_dim=0, num_train_timesteps=1000, sigma_data=1.0):
        t_lo = 1 / num_train_timesteps
        t_hi = 1 - t_lo
        super().__init__(img_shape, label_dim, t_lo / (1 - t_lo), t_hi / (1 - t_hi), sigma_data)
        self.network = network
        self.kw = {"num_train_timesteps": int(num_train_timesteps), "sigma_data": float(sigma_data)}

    def precond_kwargs(self):
        return dict(self.kw)

    def _denoise(self, x, sigma, labels):
        t = sigma / (1 + sigma)
        x_t = x / self._bcast(1 + sigma, x)
        v = self._run(self.network, x_t, t * self.kw["num_train_timesteps"], labels)
        return x_t - self._bcast(t, x) * v


PRECONDS = {"diffusers-vp": DiffusersVPPrecond, "flow": FlowPrecond}


def alphas_cumprod(steps: int, beta_start: float, beta_end: float, schedule: str) -> torch.Tensor:
    """diffusers' alphas_cumprod (computed in float32 as its schedulers do), as float64 (on the CPU,
    also when networks are built on the meta device for an estimate)."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float32, device="cpu")
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32, device="cpu") ** 2
    elif schedule == "squaredcos_cap_v2":

        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=torch.float32, device="cpu"
        )
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")
    return torch.cumprod(1.0 - betas, dim=0).double()
