"""diffusers pipelines as teachers: SD 1.x/2.x and SDXL UNets (epsilon or v), SD3-class flow
transformers, in latent space (with their VAE) or pixel space, text-conditioned through cached
prompt embeddings, with classifier-free guidance in the teacher.

Nothing executes code from the weights: components load with use_safetensors=True (a pipeline
holding only pickled .bin weights is refused) and trust_remote_code is never passed. The text
encoders run once, when the prompt set is encoded (the pipeline's own `encode_prompt`, so the
embeddings are exactly what the pipeline would feed its network); distillation then holds only
the cached table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..conditioning import PromptConditions, read_prompts
from ..errors import UserError
from ..networks.diffusers_nets import ARCHS, PRECONDS, cond_width, require_diffusers
from ..networks.precond import Denoiser

HEAVY = ("unet", "transformer", "vae", "safety_checker", "feature_extractor", "image_encoder")
VP_SCHEDULERS = {
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}


# -- the pipeline directory ------------------------------------------------------------------------
def pipeline_root(spec) -> Path:
    """The local pipeline directory: teacher.path, or teacher.model_id from the Hugging Face cache
    (downloaded once when online: safetensors, configs and tokenizer files only)."""
    if spec.path is not None:
        root = Path(spec.path)
        if not root.is_dir():
            raise UserError(f"teacher.path: {root}: no such pipeline directory (relative paths start at {Path.cwd()})")
    else:
        root = _download(spec.model_id, spec.revision, spec.variant)
    if spec.subfolder:
        root = root / spec.subfolder
    if not (root / "model_index.json").is_file():
        raise UserError(f"teacher: {root} is not a diffusers pipeline directory (no model_index.json)")
    _network_entry(root)  # a pipeline without a network fails before its prompts are encoded
    return root


def _download(model_id: str, revision: str | None, variant: str | None) -> Path:
    from huggingface_hub import snapshot_download

    ignore = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.onnx_data", "*.pb", "*.h5", "*.gguf"]
    if variant is None:
        ignore.append("*.fp16.safetensors")
    try:
        return Path(snapshot_download(model_id, revision=revision, ignore_patterns=ignore))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, network: one message, the cause beside it
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise UserError(
            f"teacher.model_id: cannot fetch {model_id!r} ({reason}); on a machine with internet run "
            f"`huggingface-cli download {model_id}` (the cache is $HF_HOME), or copy the pipeline directory here "
            "and give it as teacher.path"
        ) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the {what} ({e.__class__.__name__})") from None


def _network_entry(root: Path) -> tuple[str, str]:
    index = _read_json(root / "model_index.json", "pipeline index")
    for name in ("unet", "transformer"):
        entry = index.get(name)
        if isinstance(entry, list) and entry and entry[-1]:
            return name, entry[-1]
    raise UserError(f"{root}: the pipeline has no unet or transformer (model_index.json lists neither)")


def _scheduler_config(root: Path) -> dict:
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise UserError(f"{root}: the pipeline has no scheduler/scheduler_config.json")
    return _read_json(path, "scheduler config")


def _load_component(cls, root: Path, sub: str, variant: str | None, what: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notices on old configs
            return cls.from_pretrained(root, subfolder=sub, use_safetensors=True, variant=variant)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{root / sub}: cannot load the {what} from safetensors ({msg})") from None


# -- the denoiser --------------------------------------------------------------------------------
def load_pipeline_denoiser(root: Path, variant: str | None, resolution: int | None, cond: dict | None) -> Denoiser:
    """The pipeline's network as an emdctl denoiser (conditioning layout `cond`, None for an
    unconditional pipeline)."""
    require_diffusers()
    import diffusers

    name, class_name = _network_entry(root)
    sched = _scheduler_config(root)
    sched_class = sched.get("_class_name", "?")
    model = _load_component(
        getattr(diffusers, class_name, None) or _unsupported(root, class_name),
        root,
        name,
        variant,
        f"{name} ({class_name})",
    )
    c = model.config
    size = int(c.sample_size if not isinstance(c.sample_size, list | tuple) else c.sample_size[0])
    vae_factor = _vae_scale_factor(root)
    if resolution is not None:
        if resolution % vae_factor:
            raise UserError(f"teacher.resolution: {resolution} is not a multiple of the VAE's factor {vae_factor}")
        size = resolution // vae_factor
    if class_name == "UNet2DConditionModel":
        if sched_class not in VP_SCHEDULERS:
            raise UserError(
                f"{root}/scheduler: scheduler {sched_class} is not supported for a UNet teacher "
                f"(supported: {', '.join(sorted(VP_SCHEDULERS))})"
            )
        if sched.get("trained_betas") is not None or sched.get("rescale_betas_zero_snr"):
            raise UserError(
                f"{root}/scheduler: trained_betas / rescale_betas_zero_snr are not supported "
                "(zero terminal SNR has no finite EDM sigma)"
            )
        prediction = sched.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise UserError(
                f"{root}/scheduler: prediction_type {prediction!r} is not supported (epsilon, v_prediction, sample)"
            )
    elif class_name == "SD3Transformer2DModel":
        if sched_class not in FLOW_SCHEDULERS:
            raise UserError(
                f"{root}/scheduler: scheduler {sched_class} is not supported for a flow transformer "
                f"(supported: {', '.join(sorted(FLOW_SCHEDULERS))})"
            )
    else:
        _unsupported(root, class_name)
    cfg = denoiser_config(class_name, dict(c), sched, size, vae_factor, cond or {"seq_len": 0, "dim": 0},
                          _sigma_data(root))  # fmt: skip
    net = ARCHS[cfg["arch"]](**cfg["arch_kwargs"], model=model)
    try:
        den = PRECONDS[cfg["precond"]](net, tuple(cfg["img_shape"]), cfg["label_dim"], **cfg["precond_kwargs"])
    except ValueError as e:
        raise UserError(f"{root}/scheduler: {e}") from None
    den.arch = {"arch": cfg["arch"], "arch_kwargs": cfg["arch_kwargs"]}
    return den


def denoiser_config(class_name: str, config: dict, sched: dict, size: int, vae_factor: int, cond: dict,
                    sigma_data: float) -> dict:  # fmt: skip
    """The emdctl denoiser config (build_denoiser's) of a diffusers network, from its config.json,
    the scheduler config, the latent size and the conditioning layout: what the teacher is loaded
    as, and what `recipe show` estimates from before anything is downloaded."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    arch_kwargs = {"config": config, "cond": cond, "time_ids": None}
    if class_name == "SD3Transformer2DModel":
        precond, arch = "flow", "diffusers-sd3"
        pk = {"num_train_timesteps": int(sched.get("num_train_timesteps", 1000))}
    else:
        precond, arch = "diffusers-vp", "diffusers-unet"
        pk = {k: sched[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in sched}
        pk["prediction_type"] = sched.get("prediction_type", "epsilon")
        if config.get("addition_embed_type") == "text_time":
            px = size * vae_factor
            arch_kwargs["time_ids"] = [px, px, 0, 0, px, px]  # original size, crop top-left, target size (SDXL)
    return {"precond": precond, "precond_kwargs": {**pk, "sigma_data": sigma_data},
            "img_shape": [int(config["in_channels"]), size, size], "label_dim": cond_width(cond), "arch": arch,
            "arch_kwargs": arch_kwargs}  # fmt: skip


def _unsupported(root: Path, class_name: str):
    raise UserError(
        f"{root}: network class {class_name} is not supported (UNet2DConditionModel or SD3Transformer2DModel)"
    )


def _vae_config(root: Path) -> dict | None:
    path = root / "vae" / "config.json"
    return _read_json(path, "VAE config") if path.is_file() else None


def _vae_scale_factor(root: Path) -> int:
    vae = _vae_config(root)
    return 2 ** (len(vae.get("block_out_channels", [0])) - 1) if vae else 1


def _sigma_data(root: Path) -> float:
    """Latents are scaled to about unit variance by the VAE's scaling factor; pixels live in [-1, 1]."""
    return 1.0 if _vae_config(root) else 0.5


# -- prompts -------------------------------------------------------------------------------------
def _text_pipeline(root: Path, variant: str | None):
    from diffusers import DiffusionPipeline

    index = _read_json(root / "model_index.json", "pipeline index")
    # The networks and the VAE are not loaded here; nor are components the pipeline was saved without.
    absent = [k for k, v in index.items() if isinstance(v, list) and not (v and v[-1])]
    skip = {name: None for name in (*HEAVY, *absent) if name in index}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return DiffusionPipeline.from_pretrained(root, use_safetensors=True, variant=variant, **skip)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{root}: cannot load the pipeline's text encoders from safetensors ({msg})") from None


def has_text_encoder(root: Path) -> bool:
    index = _read_json(root / "model_index.json", "pipeline index")
    entry = index.get("text_encoder")
    return isinstance(entry, list) and bool(entry and entry[-1])


@torch.no_grad()
def encode_prompts(root: Path, variant: str | None, prompts: list[str], device, batch: int = 32, warn=print):
    """(table [P, width], uncond [width], cond layout) through the pipeline's own encode_prompt;
    the unconditional row is what the pipeline uses without a negative prompt (the empty prompt's
    embedding, or zeros where the pipeline forces them, as SDXL does)."""
    require_diffusers()
    pipe = _text_pipeline(root, variant).to(device)
    if "transformer" in pipe.config and getattr(pipe, "transformer", None) is None:
        # SD3's encode_prompt reads the transformer's config (the width of its absent-T5 zeros),
        # nothing else of it: give it the config without loading the network.
        from types import SimpleNamespace

        cfg = _read_json(root / "transformer" / "config.json", "transformer config")
        object.__setattr__(pipe, "transformer", SimpleNamespace(config=SimpleNamespace(**cfg)))
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None:
        limit = tokenizer.model_max_length
        long = sum(len(tokenizer(p, truncation=False).input_ids) > limit for p in prompts)
        if long:
            warn(
                f"data.prompts: {long} of {len(prompts)} prompts are longer than the tokenizer's {limit} tokens "
                "and are truncated, as the pipeline truncates them"
            )
    from ..progress import Progress

    rows, uncond, layout = [], None, None
    with Progress(len(prompts), "encoding prompts", "prompts", enabled=len(prompts) > batch) as progress:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            hidden, neg, pooled, neg_pooled = _encode(pipe, chunk, device)
            flat = [hidden.flatten(1)] + ([pooled] if pooled is not None else [])
            rows.append(torch.cat(flat, 1).float().cpu())
            if uncond is None:
                parts = [neg[:1].flatten(1)] + ([neg_pooled[:1]] if neg_pooled is not None else [])
                uncond = torch.cat(parts, 1).float().cpu()[0]
                layout = {
                    "seq_len": hidden.shape[1],
                    "dim": hidden.shape[2],
                    "pooled": 0 if pooled is None else pooled.shape[1],
                }
            progress.advance(len(chunk))
    return torch.cat(rows), uncond, layout


def _encode(pipe, prompts, device):
    name = type(pipe).__name__
    kw = {"device": device, "num_images_per_prompt": 1, "do_classifier_free_guidance": True}
    if "XL" in name:
        h, n, p, np_ = pipe.encode_prompt(prompt=prompts, **kw)
        return h, n, p, np_
    if "StableDiffusion3" in name:
        h, n, p, np_ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, **kw)
        return h, n, p, np_
    h, n = pipe.encode_prompt(prompts, device, 1, True, None)
    return h, n, None, None


def load_prompt_set(root: Path, variant, prompts_file: Path, cache: Path | None, device, warn=print):
    """The prompt set of data.prompts, encoded once and cached as safetensors at `cache` (beside the
    run); a cache is reused only when the prompt file and the text encoders are the ones it was made from."""
    from ..storage import atomic_save_safetensors, read_safetensors, read_safetensors_metadata, sha256_file

    prompts = read_prompts(prompts_file)
    key = _prompt_key(root, prompts_file, sha256_file(Path(prompts_file)))
    if cache is not None and cache.is_file():
        with contextlib.suppress(UserError, KeyError, json.JSONDecodeError):
            meta = read_safetensors_metadata(cache, "cached prompt embeddings")
            if meta.get("key") == key:
                state = read_safetensors(cache, "cached prompt embeddings")
                layout = json.loads(meta["layout"])
                return PromptConditions(
                    json.loads(meta["prompts"]), state["table"], state["uncond"], str(prompts_file)
                ), layout
    table, uncond, layout = encode_prompts(root, variant, prompts, device, warn=warn)
    if cache is not None:
        with contextlib.suppress(OSError):
            meta = {"key": key, "layout": json.dumps(layout), "prompts": json.dumps(prompts)}
            atomic_save_safetensors(cache, {"table": table.contiguous(), "uncond": uncond.contiguous()}, meta)
    return PromptConditions(prompts, table, uncond, str(prompts_file)), layout


def _prompt_key(root: Path, prompts_file: Path, prompts_sha: str) -> str:
    h = hashlib.sha256(prompts_sha.encode())
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p.name.startswith(("text_encoder", "tokenizer")))):
        for f in sorted(sub.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{sub.name}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


# -- guidance -------------------------------------------------------------------------------------
class GuidedDenoiser(Denoiser):
    """Classifier-free guidance in the teacher: D_w = D_u + w (D_c - D_u), one batched call of 2B
    rows (conditional, then the unconditional row); outside the guidance interval of noise levels
    (when given) the conditional D_c alone."""

    def __init__(self, base: Denoiser, uncond: torch.Tensor, scale: float, interval: tuple[float, float] | None):
        super().__init__(base.img_shape, base.label_dim, base.sigma_min, base.sigma_max, base.sigma_data)
        self.base = base
        self.precond = base.precond
        self.register_buffer("uncond", uncond.reshape(1, -1).float(), persistent=False)
        self.scale = float(scale)
        self.interval = interval

    @property
    def is_discrete(self):
        return self.base.is_discrete

    def round_sigma(self, sigma):
        return self.base.round_sigma(sigma)

    def dsm_weight(self, sigma):
        return self.base.dsm_weight(sigma)

    def config(self):
        return self.base.config()

    def _denoise(self, x, sigma, labels):
        n = x.shape[0]
        both = self.base._denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, self.uncond.to(labels).expand(n, -1)])
        )
        d_c, d_u = both[:n], both[n:]
        w = torch.full_like(sigma, self.scale)
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((sigma >= lo) & (sigma <= hi), w, torch.ones_like(w))
        return d_u + self._bcast(w, x) * (d_c - d_u)


# -- decoding -------------------------------------------------------------------------------------
class LatentDecoder:
    """Latents -> images in [-1, 1] through the pipeline's VAE (loaded on first use)."""

    def __init__(self, root: Path, variant: str | None):
        self.root, self.variant, self.vae = Path(root), variant, None
        self.config = _vae_config(self.root) or {}  # read once: encode/decode run every iteration

    def info(self) -> dict:
        cfg = self.config
        return {
            "kind": "latent",
            "pipeline": str(self.root.resolve()),
            "variant": self.variant,
            "scaling_factor": cfg.get("scaling_factor", 0.18215),
            "shift_factor": cfg.get("shift_factor") or 0.0,
            "range": [-1.0, 1.0],
        }

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        """The shape of the images that latents of `latent_shape` (C, H, W) decode to."""
        f = 2 ** (len(self.config.get("block_out_channels", [0])) - 1)
        return (int(self.config.get("out_channels", 3)), latent_shape[-2] * f, latent_shape[-1] * f)

    def _vae(self, device):
        if self.vae is None:
            from diffusers import AutoencoderKL

            self.vae = (
                _load_component(AutoencoderKL, self.root, "vae", self.variant, "VAE").eval().requires_grad_(False)
            )
        return self.vae.to(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Images in [-1, 1] -> latents: the mean of the VAE's posterior (deterministic), shifted
        and scaled as the pipeline scales its latents."""
        info, vae = self.info(), self._vae(images.device)  # (info: no I/O)
        out = []
        for chunk in images.split(batch):
            mean = vae.encode(chunk.to(vae.dtype), return_dict=False)[0].mean
            out.append((mean.float() - info["shift_factor"]) * info["scaling_factor"])
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        info = self.info()
        vae = self._vae(latents.device)
        out = []
        for chunk in latents.split(batch):
            z = chunk.to(vae.dtype) / info["scaling_factor"] + info["shift_factor"]
            out.append(vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        return torch.cat(out)


def decoder_from_info(info: dict) -> LatentDecoder | None:
    if info.get("kind") != "latent":
        return None
    return LatentDecoder(Path(info["pipeline"]), info.get("variant"))


# -- offline description (memory estimates before a download) ----------------------------------------
def offline_denoiser_config(spec) -> tuple[dict, str] | None:
    """The student denoiser config of a diffusers teacher, from what is on disk without loading
    weights: the pipeline directory, the Hugging Face cache, or (for the official pipelines the
    recipes name) emdctl's table of their configs. None when none of these knows it."""
    from .known_pipelines import KNOWN

    root = None
    if spec.path is not None and (Path(spec.path) / "model_index.json").is_file():
        root = Path(spec.path) / (spec.subfolder or "")
    elif spec.model_id is not None:
        root = _cached_root(spec.model_id, spec.revision, spec.subfolder)
    if root is not None:
        name, class_name = _network_entry(root)
        config = _read_json(root / name / "config.json", f"{name} config")
        sched = _scheduler_config(root)
        factor, where, sigma_data = _vae_scale_factor(root), str(root), _sigma_data(root)
        tok = root / "tokenizer" / "tokenizer_config.json"
        seq = int(_read_json(tok, "tokenizer config").get("model_max_length", 77)) if tok.is_file() else 77
        if seq > 10_000:
            seq = 77
        if class_name == "SD3Transformer2DModel":
            cond = {
                "seq_len": seq + 256,
                "dim": config["joint_attention_dim"],
                "pooled": config["pooled_projection_dim"],
            }
        else:
            pooled = 0
            if config.get("addition_embed_type") == "text_time":
                pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            cond = {"seq_len": seq, "dim": config["cross_attention_dim"], "pooled": pooled}
    elif spec.model_id in KNOWN:
        known = KNOWN[spec.model_id]
        class_name, config, cond = known["class"], dict(known["config"]), known["cond"]
        sched, factor, where = known["scheduler"], known["vae_factor"], "emdctl's table of official pipelines"
        sigma_data = 1.0  # (all latent pipelines)
    else:
        return None
    size = config["sample_size"] if spec.resolution is None else spec.resolution // factor
    return denoiser_config(class_name, config, sched, size, factor, cond, sigma_data), where


def _cached_root(model_id: str, revision: str | None, subfolder: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
    if not isinstance(found, str):
        return None
    root = Path(found).parent / (subfolder or "")
    return root if any((root / n / "config.json").is_file() for n in ("unet", "transformer")) else None
