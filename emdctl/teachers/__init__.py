"""Teachers: one interface for every kind of pretrained diffusion model.

A `Teacher` is a frozen EDM-form denoiser D(x; sigma, labels) plus what distillation needs to know:
the config from which the student networks (generator, fake score) are built, and the weights they
start from (the teacher's own; for an analytic mixture, a small MLP fitted to its exact denoiser).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import diffusion
from ..conditioning import ClassConditions, Conditions
from ..errors import UserError
from ..networks import build_denoiser, check_config_fits_weights
from ..networks.precond import Denoiser, DiscreteVPPrecond
from ..networks.pulfer_unet import PulferUNet
from ..storage import load_model_dir, load_state_strict, module_state, save_model_dir, sha256_file
from .mixture import GaussianMixture, MixtureDenoiser, preset_mixture


@dataclass
class Teacher:
    denoiser: Denoiser
    source: str
    student_config: dict
    init_weights: Callable[[], dict[str, torch.Tensor]]
    mixture: GaussianMixture | None = None
    extra: dict = field(default_factory=dict)
    # What the conditioning vectors are drawn from (class labels, a prompt set); None: the
    # denoiser's label_dim classes, or unconditional.
    conditions: Conditions | None = None
    # Latents -> images in [-1, 1] (a latent diffusers teacher's VAE); None for pixel teachers.
    decode: Callable | None = None
    # What a generator's samples are (its config's `data`); None: images in [-1, 1] or vectors.
    data: dict | None = None
    # Images in [-1, 1] -> latents (a latent teacher's VAE encoder), and the image shape it takes.
    encode: Callable | None = None
    pixels: tuple[int, ...] | None = None
    # A captions JSONL -> the Conditions of its lines (text-conditioned teachers' real data).
    captions: Callable | None = None

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of the teacher's images (of its latents' decoding, for a latent teacher)."""
        return tuple(self.pixels) if self.pixels is not None else tuple(self.img_shape)

    def caption_conditions(self, path: Path) -> Conditions:
        if self.captions is None:
            raise UserError("method.data.captions: this teacher takes no text")
        return self.captions(path)

    def __post_init__(self):
        if self.conditions is None:
            self.conditions = ClassConditions(self.label_dim) if self.label_dim else Conditions()

    @property
    def img_shape(self) -> tuple[int, ...]:
        return self.denoiser.img_shape

    @property
    def label_dim(self) -> int:
        """The width of the conditioning vector (one-hot classes, or a flat prompt embedding)."""
        return self.denoiser.label_dim

    @property
    def is_image(self) -> bool:
        return len(self.img_shape) == 3

    def describe(self) -> dict:
        out = {
            "source": self.source,
            "precond": self.denoiser.precond,
            "img_shape": list(self.img_shape),
            "label_dim": self.label_dim,
            "discrete": self.denoiser.is_discrete,
            "conditions": self.conditions.describe(),
        }
        if self.extra.get("guidance"):
            out["guidance"] = self.extra["guidance"]
        if self.mixture is not None:
            out["mixture"] = self.mixture.to_dict()
        return out

    @torch.no_grad()
    def follows_level_shifts(self, tol: float = 1e-3) -> bool:
        """Whether the denoiser moves with any shift of an image's mean level, D(x + c) = D(x) + c,
        so that its score cannot see the level (method.pin_level is for such teachers). Probed on
        two fixed random images at three noise levels: one batch of six, twice."""
        if not self.is_image:
            return False
        den = self.denoiser
        device = next(den.parameters()).device
        g = torch.Generator().manual_seed(0)
        sigma = den.round_sigma(torch.tensor([0.1, 1.0, 10.0], device=device).repeat_interleave(2)).float()
        clean = torch.rand(6, *self.img_shape, generator=g) * 2 - 1
        x = clean.to(device) + sigma.reshape(-1, 1, 1, 1) * torch.randn(clean.shape, generator=g).to(device)
        c = torch.tensor([0.5, -0.7], device=device).repeat(3).reshape(-1, 1, 1, 1)
        labels = self.conditions(torch.arange(6) % self.conditions.count) if self.conditions.count else None
        labels = labels.to(device) if labels is not None else None
        moved = den(x + c, sigma, labels) - c - den(x, sigma, labels)
        return bool(moved.abs().max() < tol)


def _existing(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such {what} (relative paths are resolved from {Path.cwd()})")
    return path


def _check_sha(path: Path, expected: str | None) -> None:
    if expected and sha256_file(path) != expected.lower():
        raise UserError(f"{path}: sha256 does not match teacher.sha256 ({expected}); the file is not the one expected")


def load_ddpm_pulfer(path: Path, timesteps=1000, beta_start=1e-4, beta_end=0.02, sha256=None) -> DiscreteVPPrecond:
    """The MNIST DDPM (Pulfer's MyUNet state_dict, keys 'network.*'), read with weights_only."""
    path = _existing(path, "teacher checkpoint")
    _check_sha(path, sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; all mean the same here
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "Weights only load failed" in text:
            raise UserError(
                f"{path}: holds pickled objects other than tensors, which a safe load refuses and emdctl never "
                "runs; save the model's state_dict of tensors (torch.save(model.state_dict(), ...)) and use that"
            ) from None
        msg = text.splitlines()[0][:200] if text else e.__class__.__name__
        raise UserError(f"{path}: cannot read the teacher checkpoint safely ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict of tensors (MyDDPM or MyUNet)")
    if not any(k.startswith("network.") for k in state):
        state = {f"network.{k}": v for k, v in state.items()}
    net = PulferUNet(n_steps=timesteps)
    den = DiscreteVPPrecond(net, (1, 28, 28), 0, timesteps, beta_start, beta_end)
    den.arch = {"arch": "pulfer-unet", "arch_kwargs": {"n_steps": timesteps, "time_emb_dim": 100}}
    load_state_strict(den, state, str(path))
    return den


def load_pretrained_denoiser(path: Path) -> Denoiser:
    config, state = load_model_dir(_existing(path, "model directory"), expect_kind="denoiser")
    if not isinstance(config.get("denoiser"), dict):
        raise UserError(f"{path}: config.json has no denoiser description; re-convert the teacher")
    check_config_fits_weights(config["denoiser"], state, str(path))
    try:
        den = build_denoiser(config["denoiser"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: config.json does not describe a buildable denoiser ({e})") from None
    load_state_strict(den, state, str(path))
    return den


def save_pretrained_denoiser(den: Denoiser, directory: Path, extra: dict | None = None) -> Path:
    cfg = {"kind": "denoiser", "denoiser": den.config(), **(extra or {})}
    return save_model_dir(directory, module_state(den), cfg)


def fit_mixture_network(
    mixture: GaussianMixture, config: dict, steps: int, batch: int, lr: float, seed: int, device
) -> dict[str, torch.Tensor]:
    """The MLP fitted to the exact mixture denoiser (regression, EDM weighting, log-uniform sigma).

    This network initializes the generator and fake score, as the teacher's weights do for a
    network teacher. Deterministic given its inputs, so it is cached (EMDCTL_CACHE/teacher-fits/,
    keyed by the mixture, the network, the fit settings, the seed, the device type and the torch
    version): `demo` and repeated runs load it instead of fitting it again.
    """
    from ..hub import cache_dir
    from ..storage import atomic_save_safetensors, read_safetensors

    key_data = {"mixture": mixture.to_dict(), "network": config, "steps": steps, "batch": batch, "lr": lr,
                "seed": seed, "device": torch.device(device).type, "torch": torch.__version__}  # fmt: skip
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_dir() / "teacher-fits" / f"mlp-{key}.safetensors"
    if cached.is_file():
        try:
            return read_safetensors(cached, "cached teacher fit")
        except UserError:
            pass  # a damaged cache entry: fit again and overwrite it
    state = _fit_mixture_network(mixture, config, steps, batch, lr, seed, device)
    with contextlib.suppress(OSError):  # a read-only or full cache only costs the next run a refit
        atomic_save_safetensors(cached, state, {"emdctl": json.dumps({"kind": "teacher-fit", **key_data})})
    return state


def _fit_mixture_network(mixture, config, steps, batch, lr, seed, device) -> dict[str, torch.Tensor]:
    from ..progress import Progress
    from ..rng import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "teacher-fit-init"))
        den = build_denoiser(config).to(device).train()
    opt = torch.optim.Adam(den.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "teacher-fit"))
    lo, hi = torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(100.0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with Progress(steps, "fitting the mixture teacher's MLP", "steps") as progress:
        for _ in range(steps):
            x0 = mixture.sample(batch, generator=gen).float()
            sigma = (lo + torch.rand(batch, generator=gen) * (hi - lo)).exp()
            noise = torch.randn(batch, mixture.dim, generator=gen)
            x0, sigma, noise = x0.to(device), sigma.to(device), noise.to(device)
            x = x0 + sigma[:, None] * noise
            target = mixture.denoise(x.double(), sigma.double()).float()
            w = diffusion.edm_loss_weight(sigma, den.sigma_data)[:, None]
            loss = (w * (den(x, sigma) - target).square()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.advance()
    return {k: v.detach().cpu() for k, v in den.state_dict().items()}


def _mlp_student_config(mixture: GaussianMixture, net) -> dict:
    return {
        "precond": "edm",
        "precond_kwargs": {"sigma_data": round(mixture.data_std(), 6), "sigma_min": 0.0, "sigma_max": None},
        "img_shape": [mixture.dim],
        "label_dim": 0,
        "arch": "mlp",
        "arch_kwargs": {"hidden": net.hidden, "layers": net.layers, "emb_dim": net.emb_dim},
    }


def load_teacher(
    spec, seed: int = 0, device: str | torch.device = "cpu", prompts: Path | None = None,
    prompt_cache: Path | None = None, warn=print,
) -> Teacher:  # fmt: skip
    """Build the teacher a recipe's `teacher:` section describes (frozen, on `device`). A diffusers
    teacher with text encoders takes its prompt set from `prompts` (cached at `prompt_cache`)."""
    kind = spec.kind
    if kind == "diffusers":
        return load_diffusers_teacher(spec, device, prompts, prompt_cache, warn)
    if kind == "mixture":
        params = preset_mixture(spec.preset) if spec.preset else spec.mixture.model_dump()
        mixture = GaussianMixture(params["weights"], params["means"], params["scales"])
        den = MixtureDenoiser(mixture)
        cfg = _mlp_student_config(mixture, spec.network)
        fit = spec.fit
        source = f"mixture:{spec.preset or 'custom'} ({mixture.num_components} components, {mixture.dim}-D)"
        return Teacher(
            denoiser=den.to(device),
            source=source,
            student_config=cfg,
            init_weights=lambda: fit_mixture_network(mixture, cfg, fit.steps, fit.batch, fit.lr, seed, device),
            mixture=mixture,
        )
    if kind == "ddpm-pulfer":
        den = load_ddpm_pulfer(spec.path, spec.timesteps, spec.beta_start, spec.beta_end, spec.sha256)
        source = f"ddpm-pulfer:{spec.path}"
    elif kind == "edm-pickle":
        from ..hub import fetch
        from .edm_pickle import load_edm_pickle

        path = (
            Path(spec.path)
            if spec.path is not None
            else fetch(spec.url, spec.sha256, "EDM teacher pickle", local="teacher.path (instead of teacher.url)")
        )
        path = _existing(path, "EDM network pickle")
        if spec.path is not None:
            _check_sha(path, spec.sha256)
        den = load_edm_pickle(path)
        source = f"edm-pickle:{spec.path or spec.url}"
    elif kind == "pretrained":
        den = load_pretrained_denoiser(spec.path)
        source = f"pretrained:{spec.path}"
    else:  # pragma: no cover - the recipe schema rejects other kinds
        raise UserError(f"unknown teacher kind {kind!r}")
    expected = spec.expected_resolution()
    if expected is not None and den.img_shape[-1] != expected:
        raise UserError(
            f"teacher.resolution: the recipe expects {expected}x{expected} images but the teacher "
            f"({source}) is {den.img_shape[-2]}x{den.img_shape[-1]}"
        )
    den = den.to(device).eval().requires_grad_(False)
    weights = {k: v.detach().cpu().clone() for k, v in den.state_dict().items()}
    return Teacher(
        denoiser=den,
        source=source,
        student_config=copy.deepcopy(den.config()),
        init_weights=lambda: {k: v.clone() for k, v in weights.items()},
    )


def recipe_teacher(recipe, device="cpu", run_root: Path | None = None, warn=print) -> Teacher:
    """The teacher of a distill recipe, with its prompt set (data.prompts) cached in `run_root`."""
    prompts = recipe.data.prompts if getattr(recipe, "data", None) is not None else None
    cache = Path(run_root) / "prompts.safetensors" if run_root is not None and prompts is not None else None
    return load_teacher(recipe.teacher, seed=recipe.seed, device=device, prompts=prompts, prompt_cache=cache, warn=warn)


def load_diffusers_teacher(spec, device, prompts: Path | None, prompt_cache: Path | None, warn=print) -> Teacher:
    from .diffusers_pipeline import (
        GuidedDenoiser,
        LatentDecoder,
        has_text_encoder,
        load_pipeline_denoiser,
        load_prompt_set,
        pipeline_root,
    )

    root = pipeline_root(spec)
    conditions, layout = None, None
    if has_text_encoder(root):
        if prompts is None:
            raise UserError("data.prompts: this teacher is text-conditioned; give a prompt file (one prompt per line)")
        conditions, layout = load_prompt_set(root, spec.variant, prompts, prompt_cache, device, warn)
    elif prompts is not None:
        raise UserError(f"data.prompts: {root} has no text encoder; remove data.prompts")
    base = load_pipeline_denoiser(root, spec.variant, spec.resolution, layout).to(device).eval().requires_grad_(False)
    student_config = copy.deepcopy(base.config())
    den, extra = base, {}
    g = spec.guidance
    if g.scale != 1.0:
        if conditions is None:
            raise UserError("teacher.guidance: the teacher is unconditional; remove teacher.guidance")
        den = GuidedDenoiser(base, conditions.uncond, g.scale, tuple(g.interval) if g.interval else None).to(device)
        extra["guidance"] = g.model_dump()
    decoder = LatentDecoder(root, spec.variant) if (root / "vae").is_dir() else None
    data = decoder.info() if decoder else {"kind": "image", "range": [-1.0, 1.0]}
    data = {**data, "pipeline": str(root.resolve()), "variant": spec.variant}
    pixels = decoder.image_shape(base.img_shape) if decoder is not None else None

    def captions(path: Path):
        from ..hub import cache_dir

        cache = (
            cache_dir()
            / "caption-embeddings"
            / f"{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]}.safetensors"
        )
        return load_prompt_set(root, spec.variant, Path(path), cache, device, warn)[0]

    return Teacher(
        denoiser=den,
        source=f"diffusers:{spec.path or spec.model_id}",
        student_config=student_config,
        # The frozen teacher itself, copied when asked (no standing copy of a multi-GB network).
        init_weights=lambda: {k: v.detach().cpu().clone() for k, v in base.state_dict().items()},
        extra=extra,
        conditions=conditions,
        decode=decoder,
        data=data,
        encode=decoder.encode if decoder else None,
        pixels=pixels,
        captions=captions if conditions is not None else None,
    )


__all__ = [
    "GaussianMixture",
    "MixtureDenoiser",
    "Teacher",
    "fit_mixture_network",
    "load_ddpm_pulfer",
    "load_pretrained_denoiser",
    "load_teacher",
    "recipe_teacher",
    "save_pretrained_denoiser",
]
