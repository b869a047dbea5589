"""The recipe schema: pydantic models, the one source of every default.

A recipe is plain data. Every run dumps its fully resolved recipe (all defaults filled in) beside
its outputs, so a run directory alone says exactly what was run. Two kinds exist: `distill` (the
default) and `teacher-train`. Each section's spec class owns its rules; a method's rules against
the rest of the recipe live in its spec's `check` (MethodSpecBase).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------------------------
# Field types


def parse_image_count(value: Any) -> Any:
    """Durations and cadences are counted in images seen: 200000, "500k", "10M", "1.5M"."""
    if isinstance(value, bool):
        raise ValueError("expected an image count like 200000, 500k or 10M")
    if isinstance(value, int | float):
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise ValueError("expected a whole number of images, like 200000, 500k or 10M")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgG]?)\s*", value)
        if m:
            scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
            n = float(m.group(1).replace("_", "")) * scale
            if n == int(n):
                return int(n)
    raise ValueError("expected an image count like 200000, 500k or 10M")


# Bounds: values that validate must also run. Beyond these, allocations or the optimizer fail later
# with a traceback (a batch of 1e12, an MLP of width 1e9, a learning rate of 1e308 or inf).
MAX_IMAGES = 10**15
ImageCount = Annotated[int, BeforeValidator(parse_image_count), Field(ge=0, le=MAX_IMAGES)]
PositiveImageCount = Annotated[int, BeforeValidator(parse_image_count), Field(gt=0, le=MAX_IMAGES)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0, le=2**31 - 1)]
Width = Annotated[int, Field(gt=0, le=65536)]  # channels / units of a layer
LearningRate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------
# Noise levels and networks


class NoiseLevels(Strict):
    """Distribution of the noise level sigma (EDM's time variable).

    lognormal: ln(sigma) ~ N(p_mean, p_std^2) (EDM training).  loguniform: ln(sigma) uniform on
    [ln sigma_min, ln sigma_max].  karras: sigma = (smax^(1/rho) + u (smin^(1/rho) - smax^(1/rho)))^rho,
    u ~ U(0, 1) (the EDM sampling schedule, used by SiD/DMD-style distillation).  Whatever the
    distribution, sigma is clipped to [sigma_min, sigma_max] and rounded to a discrete teacher's grid.
    """

    dist: Literal["lognormal", "loguniform", "karras"] = "lognormal"
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2
    sigma_min: PositiveFloat = 0.002
    sigma_max: PositiveFloat = 80.0
    rho: PositiveFloat = 7.0

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class MLPNetwork(Strict):
    """The small MLP denoiser used for low-dimensional (analytic) problems."""

    hidden: Width = 256
    layers: Annotated[int, Field(gt=0, le=64)] = 4
    emb_dim: Width = 64


# --------------------------------------------------------------------------------------------
# Teachers


class MixtureSpec(Strict):
    """An isotropic Gaussian mixture: sum_k w_k N(mu_k, s_k^2 I)."""

    weights: list[PositiveFloat] = Field(min_length=1)
    means: list[list[float]] = Field(min_length=1)
    scales: list[PositiveFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        k = len(self.weights)
        if len(self.means) != k or len(self.scales) != k:
            raise ValueError(
                f"weights, means and scales must have one entry per component "
                f"(got {len(self.weights)}, {len(self.means)}, {len(self.scales)})"
            )
        dims = {len(m) for m in self.means}
        if len(dims) != 1 or 0 in dims:
            raise ValueError("every mean must have the same, non-zero dimension")
        return self


class TeacherFit(Strict):
    """How the MLP that initializes the generator and fake score is fitted to an analytic teacher."""

    steps: Annotated[int, Field(gt=0, le=10**7)] = 1500
    batch: Annotated[int, Field(gt=0, le=2**20)] = 1024
    lr: LearningRate = 2e-3


class TeacherSpecBase(Strict):
    """What the rules of other sections need to know of a teacher, whatever its kind."""

    is_mixture: ClassVar[bool] = False

    def expected_resolution(self) -> int | None:
        """The image resolution the recipe expects of the teacher (checked when it is loaded)."""
        return None


class ImageTeacherSpec(TeacherSpecBase):
    """A network teacher of images; each kind has a `resolution` field (checked when loaded)."""

    def expected_resolution(self) -> int | None:
        return self.resolution


class MixtureTeacherSpec(TeacherSpecBase):
    is_mixture: ClassVar[bool] = True
    kind: Literal["mixture"]
    preset: Literal["ring8-unequal", "ring8", "grid25-unequal"] | None = None
    mixture: MixtureSpec | None = None
    network: MLPNetwork = MLPNetwork()
    fit: TeacherFit = TeacherFit()

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.mixture is None):
            raise ValueError("give exactly one of 'preset' or 'mixture'")
        return self


class DDPMPulferTeacherSpec(ImageTeacherSpec):
    """A discrete-time epsilon-prediction DDPM with Pulfer's MyUNet (the MNIST teacher in shared/data)."""

    kind: Literal["ddpm-pulfer"]
    path: Path
    sha256: str | None = None
    resolution: PositiveInt | None = None
    timesteps: Annotated[int, Field(gt=0, le=100_000)] = 1000
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02


class EDMPickleTeacherSpec(ImageTeacherSpec):
    """An official NVlabs/edm network pickle, read without executing any code from it."""

    kind: Literal["edm-pickle"]
    path: Path | None = None
    url: str | None = None
    sha256: str | None = None
    resolution: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.url is None:
            raise ValueError("give 'path' (a local .pkl) or 'url' (downloaded once into the cache)")
        return self


class PretrainedTeacherSpec(ImageTeacherSpec):
    """An emdctl model directory: model.safetensors + config.json (e.g. from `emdctl teacher convert`)."""

    kind: Literal["pretrained"]
    path: Path
    resolution: PositiveInt | None = None


class Guidance(Strict):
    """Classifier-free guidance in the teacher: D_w = D_u + scale (D_c - D_u), the unconditional
    branch from the pipeline's empty prompt; `interval` [sigma_lo, sigma_hi] (EDM sigma) limits it
    to those noise levels (outside it, the conditional D_c). scale 1 = no guidance."""

    scale: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 1.0
    interval: tuple[PositiveFloat, PositiveFloat] | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.interval is not None and self.interval[0] >= self.interval[1]:
            raise ValueError("interval must be [sigma_lo, sigma_hi] with sigma_lo < sigma_hi")
        return self


class DiffusersTeacherSpec(TeacherSpecBase):
    """A diffusers pipeline (SD 1.x/2.x, SDXL UNets; SD3-class flow transformers): a local pipeline
    directory (`path`) or a Hugging Face model id (downloaded once into the cache; safetensors only).
    resolution: the image size in pixels (default: the network's sample size times the VAE's factor)."""

    kind: Literal["diffusers"]
    path: Path | None = None
    model_id: str | None = None
    revision: str | None = None
    variant: str | None = None
    subfolder: str | None = None
    resolution: PositiveInt | None = None
    guidance: Guidance = Guidance()

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.model_id is None):
            raise ValueError("give exactly one of 'path' (a local pipeline directory) or 'model_id'")
        return self


TeacherSpec = Annotated[
    Union[MixtureTeacherSpec, DDPMPulferTeacherSpec, EDMPickleTeacherSpec, PretrainedTeacherSpec, DiffusersTeacherSpec],  # noqa: UP007
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------
# Generator, methods, fake score


class LoRA(Strict):
    """LoRA adapters (peft) on a frozen copy of the teacher's diffusers network: rank r, scale
    alpha / r, on the linear layers named in `targets` (default: every attention projection)."""

    rank: Annotated[int, Field(gt=0, le=1024)] = 64
    alpha: PositiveFloat = 64.0
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class GeneratorSpec(Strict):
    """g(z) = D_teacher(sigma* z; sigma*) with the teacher's weights (Sec. 'Generator initialization').
    init_from: start instead from the generator of an earlier emdctl run or exported model directory
    (its EMA weights; e.g. SiD²A = SiDA started from a SiD run); its sigma* and architecture must be
    this recipe's."""

    sigma_init: PositiveFloat | None = 2.5
    lambda_init: float | None = None
    arch_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: Path | None = None
    lora: LoRA | None = None

    @model_validator(mode="before")
    @classmethod
    def _lambda_wins(cls, data: Any):
        # lambda_init (log-SNR, lambda = -2 ln sigma) replaces the default sigma_init when given.
        if isinstance(data, dict) and data.get("lambda_init") is not None and "sigma_init" not in data:
            data = {**data, "sigma_init": None}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.sigma_init is None) == (self.lambda_init is None):
            raise ValueError("give exactly one of sigma_init or lambda_init")
        return self

    @property
    def sigma_star(self) -> float:
        return self.sigma_init if self.sigma_init is not None else math.exp(-self.lambda_init / 2)


class Langevin(Strict):
    """The E-step: K Langevin steps on (eps, z).

    z_step_scaling: 'sigma2' preconditions the z-chain of each sample by sigma^2 / (sigma^2 +
    sigma_data^2): grad_z log pi = J^T Delta - z has curvature ~ |J|^2 / sigma^2, so one constant
    z-step diverges at small sigma. A constant preconditioner per chain leaves the target unchanged.
    'none' uses gamma_z as given at every noise level."""

    steps: Annotated[int, Field(ge=0, le=1000)] = 8
    gamma_eps: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.1
    gamma_z: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.0
    z_step_scaling: Literal["sigma2", "none"] = "sigma2"
    cancel_noise: bool = True
    cancel_noise_z: bool = False
    # Keeping the -gamma eps prior pull in the M-step's direction adds zero-mean noise of size
    # gamma K eps^0 to it; measured clearly worse (docs/algorithm.md, `prior_pull`).
    prior_pull: bool = False
    fused_update: Literal["off", "on"] = "on"  # used on CUDA with Triton when gamma_z = 0 (docs/performance.md)


Weighting = Literal["sigma2", "uniform", "dmd"]


class MethodSpecBase(Strict):
    """What the engine and the recipe's other sections need to know of a method. Each method's own
    cross-field rules (against the teacher, the generator, the precision policy) live in its `check`,
    which the recipe calls once everything is parsed: adding a method adds no rule elsewhere."""

    can_pin_level: ClassVar[bool] = False

    def levels_pinned(self) -> bool:
        return False

    def own_noise_levels(self) -> NoiseLevels | None:
        """The method's noise levels (None: it has none)."""
        return None

    def fake_noise_levels(self) -> NoiseLevels | None:
        """The fake score's default noise levels: by default the method's own (None: it has none)."""
        return self.own_noise_levels()

    def check(self, recipe) -> None:
        self.check_cuda_graphs(recipe)

    def check_cuda_graphs(self, recipe) -> None:
        if recipe.precision.cuda_graphs:
            raise ValueError("precision.cuda_graphs: replays EMD's E-step; remove it for this method")


class PinnableSpec(MethodSpecBase):
    """pin_level: remove each image's per-channel mean from the generator's direction d, so the
    loss never pushes the output level. For teachers whose score cannot see an image's mean level
    (the MNIST DDPM: D(x + c) = D(x) + c): their density is flat along it, so d's mean there is only
    the bias of the teacher and the fake score, and it drives the level away without bound."""

    can_pin_level: ClassVar[bool] = True

    def levels_pinned(self) -> bool:
        return self.pin_level

    def own_noise_levels(self) -> NoiseLevels | None:
        return self.noise_levels

    def check(self, recipe) -> None:
        super().check(recipe)
        if self.pin_level and recipe.teacher.is_mixture:
            raise ValueError("method.pin_level: pins an image's mean level; a mixture teacher has none, remove it")


class EMDSpec(PinnableSpec):
    name: Literal["emd"]
    langevin: Langevin = Langevin()
    noise_levels: NoiseLevels = NoiseLevels(dist="loguniform", sigma_min=0.02, sigma_max=80.0)
    weighting: Weighting = "sigma2"
    pin_level: bool = False

    def check_cuda_graphs(self, recipe) -> None:
        p, lang = recipe.precision, self.langevin
        if p.cuda_graphs and (not p.compile or lang.fused_update != "off" or lang.gamma_z != 0):
            raise ValueError(
                "precision.cuda_graphs: replays the E-step compiled as one graph, which needs precision.compile: "
                "true, method.langevin.fused_update: off and gamma_z: 0; set those or remove cuda_graphs"
            )


class DiffInstructSpec(PinnableSpec):
    name: Literal["diff-instruct"]
    noise_levels: NoiseLevels = NoiseLevels(dist="loguniform", sigma_min=0.02, sigma_max=80.0)
    weighting: Weighting = "sigma2"
    pin_level: bool = False


class DataSpec(Strict):
    """A dataset on disk (format detected from the path unless given). captions: for a
    text-conditioned (diffusers) teacher, a JSONL of {"file": NAME, "prompt": TEXT}, NAME an image's
    path inside the folder or zip (the index.jsonl `emdctl sample --prompts` writes has this form)."""

    path: Path
    format: Literal["auto", "edm-zip", "folder", "mnist", "npz"] = "auto"
    labels: bool = False
    xflip: bool = False
    resolution: PositiveInt | None = None
    max_images: PositiveInt | None = None
    captions: Path | None = None


class MomentMatchingSpec(MethodSpecBase):
    """Moment Matching (Salimans et al. 2024, alternating variant) with a k-step student, k = steps.

    The student samples ancestrally from sigma* down its levels sigma* = sigma_k > ... > sigma_1
    (`levels`; default EDM's schedule on k + 1 points from sigma* to noise_levels.sigma_min, the
    last dropped). Training draws s from noise_levels (at most sigma*: z_s ~ q(z_s | z_t, x~) needs
    s <= t, and so must fake_score.noise_levels, the auxiliary denoiser's), takes the step whose
    level t is the smallest >= s, and makes its input z_t: sigma* z at the top level; below it from
    the student's own sampler (z_t 'student', no data; costs up to k - 1 extra forward passes) or
    forward-diffused data (z_t 'data', the paper's choice: method.data, or for a mixture teacher
    the mixture itself)."""

    name: Literal["moment-matching"]
    noise_levels: NoiseLevels = NoiseLevels(dist="loguniform", sigma_min=0.02, sigma_max=2.5)
    weighting: Weighting = "sigma2"
    steps: Annotated[int, Field(ge=1, le=8)] = 1
    levels: list[PositiveFloat] | None = None
    z_t: Literal["student", "data"] = "student"
    data: DataSpec | None = None

    def own_noise_levels(self) -> NoiseLevels | None:
        return self.noise_levels

    def check(self, recipe) -> None:
        super().check(recipe)
        t = recipe.generator.sigma_star
        for field, levels in (("method.noise_levels", self.noise_levels),
                              ("fake_score.noise_levels", recipe.fake_score.noise_levels)):  # fmt: skip
            if levels.sigma_max > t * (1 + 1e-6):
                raise ValueError(
                    f"{field}.sigma_max ({levels.sigma_max:g}) must not exceed the generator's sigma* ({t:g}) "
                    f"for moment-matching: it re-noises the student's samples to levels s <= sigma*; "
                    f"set {field}.sigma_max to at most {t:g}"
                )
        m = self
        if m.levels is not None:
            shown = ", ".join(f"{v:g}" for v in m.levels)
            if len(m.levels) != m.steps:
                raise ValueError(f"method.levels: {len(m.levels)} levels ({shown}) for method.steps {m.steps}")
            if abs(m.levels[0] - t) > 1e-6 * t or any(b >= a for a, b in zip(m.levels, m.levels[1:], strict=False)):
                raise ValueError(f"method.levels ({shown}) must start at sigma* ({t:g}) and decrease")
        levels = m.student_levels(t)
        if m.steps > 1 and not (m.noise_levels.sigma_min < levels[-1] and m.noise_levels.sigma_max > levels[1]):
            raise ValueError(
                f"method.noise_levels [{m.noise_levels.sigma_min:g}, {m.noise_levels.sigma_max:g}] must reach into "
                f"every step's range, from below {levels[-1]:g} to above {levels[1]:g} (the student's levels "
                f"{', '.join(f'{v:.4g}' for v in levels)}); widen it or set method.levels"
            )
        mixture = recipe.teacher.is_mixture
        if m.z_t == "student" and m.data is not None:
            raise ValueError("method.data: used only with method.z_t: data; remove it or set z_t: data")
        if m.z_t == "data":
            if m.steps == 1:
                raise ValueError("method.z_t: a one-step student's input is sigma* z, not data; use z_t: student")
            if mixture and m.data is not None:
                raise ValueError("method.data: a mixture teacher's data is the mixture itself; remove method.data")
            if not mixture and m.data is None:
                raise ValueError("method.data: z_t: data forward-diffuses real images; give method.data.path")

    def student_levels(self, sigma_star: float) -> list[float]:
        if self.levels is not None:
            return list(self.levels)
        from ..diffusion import few_step_levels

        return few_step_levels(self.steps, sigma_star, self.noise_levels.sigma_min)


class DiscriminatorSpec(Strict):
    """GDD's discriminator: trainable heads on a frozen feature network.

    features: 'input' puts the heads on the sample itself (an MLP for vectors; for images, conv
    heads on the image at full, 1/2 and 1/4 resolution); 'teacher' puts one conv head on the output of
    each resolution of the frozen teacher U-Net's encoder, run on the clean image at
    feature_sigma (offline stand-in for GDD's pretrained classifiers; the teacher is not distilled
    from, only read as a feature extractor); 'efficientnet' puts them on torchvision's ImageNet
    EfficientNet-B0 at strides 4-32 behind Projected GAN's fixed random mixing, the image resized to
    feature_resolution (GDD: 224), with feature_weights (a torchvision state dict) or, when null,
    torchvision's ImageNet-1k weights downloaded once into the cache. Heads are conditioned by
    projection on class labels."""

    features: Literal["input", "teacher", "efficientnet"] = "input"
    feature_sigma: PositiveFloat = 0.05
    feature_resolution: Annotated[int, Field(ge=32, multiple_of=32)] = 224
    feature_weights: Path | None = None
    channels: Width = 64
    hidden: Width = 256  # vector data: MLP width
    layers: Annotated[int, Field(gt=0, le=64)] = 3  # vector data: MLP hidden layers
    # Differentiable augmentation of everything the discriminator sees, real and generated (Zhao et
    # al. 2020, as GDD uses): images only.
    augment: list[Literal["color", "translation", "cutout"]] = Field(default_factory=list)


class GDDSpec(MethodSpecBase):
    """GDD / GDD-I (Zheng & Yang 2024): the generator (teacher at sigma*, GDD uses 80) trained by a
    GAN against real data alone, no teacher calls. data: the real images (image teachers); a
    mixture teacher's real data is drawn from the mixture itself. r1_gamma/r1_every: lazy R1 on real
    data (the penalty is scaled by r1_every, as in StyleGAN2). freeze 'gdd-i': freeze every 3x3
    convolution of the U-Net blocks and the attention output projections of the generator.
    fake_score.steps_per_iteration counts discriminator steps; optim.*_fake configure its optimizer."""

    name: Literal["gdd"]
    data: DataSpec | None = None
    discriminator: DiscriminatorSpec = DiscriminatorSpec()
    loss: Literal["non-saturating", "hinge"] = "non-saturating"
    r1_gamma: NonNegFloat = 1e-4
    r1_every: PositiveInt = 16
    freeze: Literal["none", "gdd-i"] = "none"

    def check(self, recipe) -> None:
        super().check(recipe)
        mixture = recipe.teacher.is_mixture
        if mixture and self.data is not None:
            raise ValueError("method.data: a mixture teacher's real data is the mixture itself; remove method.data")
        if not mixture and self.data is None:
            raise ValueError("method.data: gdd trains against real images; give method.data.path (the dataset)")
        if mixture and self.discriminator.augment:
            raise ValueError("method.discriminator.augment: augmentations are for images; remove it for a mixture")


def karras_sigma(u: float, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> float:
    """The point u in [0, 1] of EDM's sampling ramp (u = 0: sigma_max, u = 1: sigma_min)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + u * (b - a)) ** rho


# SiD draws t ~ U[0, tmax / 1000] and sigma at the point 1 - t of the ramp: tmax = 800 is the Karras
# distribution between sigma_min = 0.002 and this sigma_max.
SID_SIGMA_MAX = karras_sigma(0.2)


def _gan_data_check(spec, recipe, method: str) -> None:
    mixture = recipe.teacher.is_mixture
    if mixture and spec.data is not None:
        raise ValueError("method.data: a mixture teacher's real data is the mixture itself; remove method.data")
    if not mixture and spec.data is None and spec.uses_real_data():
        raise ValueError(f"method.data: {method} trains its discriminator on real images; give method.data.path")


class SiDSpec(PinnableSpec):
    """Score identity Distillation (Zhou et al. 2024, arXiv 2404.04057). The generator loss per
    sample is sum over pixels of (D_t - D_f) * ((D_t - x) - alpha (D_t - D_f)) / mean|x - D_t|, at
    x_t = x + sigma n, differentiated through x and through both networks' inputs (the official
    code's form); alpha 1.2 in the paper. noise_levels: SiD's tmax = 800 (Karras, sigma 0.002 to
    24.4). The fake score is trained by EDM's denoising loss at EDM's log-normal levels."""

    name: Literal["sid"]
    alpha: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 1.2
    noise_levels: NoiseLevels = NoiseLevels(dist="karras", sigma_min=0.002, sigma_max=SID_SIGMA_MAX)
    pin_level: bool = False

    def fake_noise_levels(self) -> NoiseLevels | None:
        return NoiseLevels()  # EDM's training distribution, ln sigma ~ N(-1.2, 1.2^2), as SiD's code


class SiDASpec(SiDSpec):
    """SiDA (Zhou et al. 2024, arXiv 2410.14919): SiD plus a GAN whose discriminator is the fake score
    network's encoder (logits: the channel mean of its bottleneck, no extra parameters), trained on
    real data (method.data; a mixture teacher's real data is the mixture). Generator, per sample:
    L_SiD + gan_gen_weight * (pixels) * mean softplus(-logit) / mean|x - D_t| at the same x_t.
    Fake score: DSM + gan_disc_weight * lambda(sigma) * (BCE(real) + BCE(fake)) / 2, the real images
    noised with the same sigma and noise as the generated ones. Defaults: the official scripts
    (alpha 1, lsg_gan / lsg = 0.01 / 100, lsd / ls = 1)."""

    name: Literal["sida"]
    alpha: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 1.0
    data: DataSpec | None = None
    gan_gen_weight: NonNegFloat = 1e-4
    gan_disc_weight: NonNegFloat = 1.0

    def uses_real_data(self) -> bool:
        return True

    def check(self, recipe) -> None:
        super().check(recipe)
        _gan_data_check(self, recipe, "sida")


class DMD2Spec(MethodSpecBase):
    """DMD2 (Yin et al. 2024, arXiv 2405.14867): distribution matching, i.e. the Diff-Instruct
    direction D_t - D_f normalized per sample by mean|x - D_t| (DMD's weighting), plus (gan: true)
    a GAN classifier head on the fake score's bottleneck trained on real data. No regression loss.
    Two time scales: fake_score.steps_per_iteration fake-score/classifier updates per generator
    update (DMD2: 5). noise_levels: DMD2's steps 2%..98% of the 1000-point Karras grid (sigma 0.00323
    to 72.05, here continuous); the fake score and the classifier's noisy inputs span the whole grid.
    Weights as the official ImageNet-64 script: gen_cls_loss_weight 3e-3, cls_loss_weight 1e-2
    (multiplied by the pixel count, because emdctl's losses sum over pixels where DMD2's average)."""

    name: Literal["dmd2"]
    noise_levels: NoiseLevels = NoiseLevels(
        dist="karras", sigma_min=karras_sigma(979 / 999), sigma_max=karras_sigma(19 / 999)
    )
    gan: bool = True
    gan_levels: NoiseLevels = NoiseLevels(dist="karras", sigma_min=0.002, sigma_max=80.0)
    data: DataSpec | None = None
    gan_gen_weight: NonNegFloat = 3e-3
    gan_disc_weight: NonNegFloat = 1e-2

    def own_noise_levels(self) -> NoiseLevels | None:
        return self.noise_levels

    def fake_noise_levels(self) -> NoiseLevels | None:
        return NoiseLevels(dist="karras", sigma_min=0.002, sigma_max=80.0)

    def uses_real_data(self) -> bool:
        return self.gan

    def check(self, recipe) -> None:
        super().check(recipe)
        _gan_data_check(self, recipe, "dmd2")
        if not self.gan and self.data is not None:
            raise ValueError("method.data: used only with method.gan: true; remove it or turn the GAN on")


MethodSpec = Annotated[
    Union[EMDSpec, DiffInstructSpec, MomentMatchingSpec, GDDSpec, SiDSpec, SiDASpec, DMD2Spec],  # noqa: UP007
    Field(discriminator="name"),
]


class FakeScore(Strict):
    """The fake score: initialized from the teacher, trained by DSM on detached generator samples.
    noise_levels: by default the method's (the fake score is then trained where the method uses it)."""

    noise_levels: NoiseLevels | None = None
    steps_per_iteration: Annotated[int, Field(gt=0, le=1000)] = 1
    arch_overrides: dict[str, Any] = Field(default_factory=dict)
    lora: LoRA | None = None


class LRDecay(Strict):
    """Both learning rates times a factor falling from 1 at `start` images to `final` at the end of
    the duration (a function of images seen, so a resumed run follows the same schedule)."""

    start: ImageCount
    final: Annotated[float, Field(gt=0, le=1)] = 0.1
    shape: Literal["cosine", "linear"] = "cosine"


class Optim(Strict):
    """Adam for both networks (adamw: decoupled weight decay, as DMD2 uses). warmup: both learning
    rates rise linearly from 0 over this many images (DMD2's constant_with_warmup)."""

    optimizer: Literal["adam", "adamw"] = "adam"
    warmup: ImageCount = 0
    lr_gen: LearningRate = 1e-5
    lr_fake: LearningRate = 1e-5
    betas_gen: tuple[Beta, Beta] = (0.0, 0.99)
    betas_fake: tuple[Beta, Beta] = (0.0, 0.99)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    grad_clip_gen: NonNegFloat = 0.0
    grad_clip_fake: NonNegFloat = 0.0
    decay: LRDecay | None = None


class Batch(Strict):
    size: Annotated[int, Field(gt=0, le=2**20)] = 256
    micro: Annotated[int, Field(gt=0, le=2**20)] | None = None

    @model_validator(mode="after")
    def _divides(self):
        if self.micro is not None and self.size % self.micro != 0:
            raise ValueError(f"micro ({self.micro}) must divide size ({self.size})")
        return self


class EMA(Strict):
    halflife: ImageCount = 500_000
    rampup: Annotated[float, Field(ge=0)] | None = 0.05


class Precision(Strict):
    """One place for numerics: networks run under autocast(dtype); preconditioning, the Langevin
    ledger, losses and optimizer states stay float32. fp16 training would need loss scaling, so
    training uses fp32 or bf16 (sampling and `emdctl bench` also offer fp16)."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False  # CUDA: the whole E-step as one graph, the other network calls individually
    cuda_graphs: bool = False  # CUDA, EMD with compile, fused_update off, gamma_z = 0: replay the E-step
    checkpointing: bool = False


class Logging(Strict):
    every: PositiveImageCount = 10_000
    grid_every: ImageCount = 100_000
    grid_size: Annotated[int, Field(gt=0, le=1024)] = 64
    progress: bool = True
    # Evaluation during training (EMA generator, fixed seeds 0..eval_samples-1, written to
    # metrics.jsonl as eval/* and drawn in curves.png): mode metrics for mixture teachers. 0: off.
    eval_every: ImageCount = 0
    eval_samples: Annotated[int, Field(gt=0, le=10**7)] = 20_000


class Checkpointing(Strict):
    every: PositiveImageCount = 100_000
    keep: PositiveInt = 3


class NaNHandling(Strict):
    policy: Literal["stop", "skip"] = "stop"
    max_skips: PositiveInt = 100


class _RunCommon(Strict):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU intra-op threads: 'auto' is 1 for vector data (small MLPs), torch's default for images
    # (emdctl.threads); results are the same at any count.
    threads: Literal["auto"] | Annotated[int, Field(gt=0, le=1024)] = "auto"
    batch: Batch = Batch()
    duration: PositiveImageCount = 1_000_000
    ema: EMA = EMA()
    precision: Precision = Precision()
    logging: Logging = Logging()
    checkpoint: Checkpointing = Checkpointing()
    nan: NaNHandling = NaNHandling()


_NO_PERIODIC_EVAL = (
    "logging.eval_every: evaluation during training covers distillation from mixture teachers only "
    "(mode metrics); set it to 0 and evaluate checkpoints or the exported model with `emdctl evaluate`"
)


class EvaluationSpec(Strict):
    """What `emdctl evaluate fid|kid|prc|all RUN` uses when the command line does not say: the
    reference (a dataset or statistics from `emdctl evaluate ref`) and the feature space."""

    reference: Path | None = None
    features: str | None = Field(default=None, pattern=r"^(inception|classifier:.+)$")


class PromptData(Strict):
    """The prompts of a text-conditioned teacher: a text file, one prompt per line, or JSONL with a
    `prompt` field. Encoded once by the pipeline's text encoders, cached beside the run."""

    prompts: Path


class DistillRecipe(_RunCommon):
    kind: Literal["distill"] = "distill"
    teacher: TeacherSpec
    data: PromptData | None = None
    generator: GeneratorSpec = GeneratorSpec()
    method: MethodSpec
    fake_score: FakeScore = FakeScore()
    optim: Optim = Optim()
    evaluation: EvaluationSpec = EvaluationSpec()

    @model_validator(mode="after")
    def _fake_score_levels_default_to_the_method(self):
        # Runs first (validators run in order): the method's rules below see the resolved levels.
        if self.fake_score.noise_levels is None:
            own = self.method.fake_noise_levels()
            self.fake_score.noise_levels = own.model_copy() if own is not None else NoiseLevels()
        return self

    @model_validator(mode="after")
    def _the_methods_own_rules(self):
        self.method.check(self)
        return self

    @model_validator(mode="after")
    def _decay_starts_before_the_end(self):
        d = self.optim.decay
        if d is not None and d.start >= self.duration:
            raise ValueError(
                f"optim.decay.start ({d.start:,} images) must come before the end of the duration "
                f"({self.duration:,} images); lower it or lengthen duration"
            )
        return self

    @model_validator(mode="after")
    def _prompts_and_lora_need_a_diffusers_teacher(self):
        diffusers = self.teacher.kind == "diffusers"
        if self.data is not None and not diffusers:
            raise ValueError("data.prompts: prompt sets are for diffusers teachers (teacher.kind: diffusers)")
        for name, lora in (("generator", self.generator.lora), ("fake_score", self.fake_score.lora)):
            if lora is not None and not diffusers:
                raise ValueError(f"{name}.lora: LoRA students are for diffusers teachers (teacher.kind: diffusers)")
        return self

    @model_validator(mode="after")
    def _evaluation_needs_a_mixture(self):
        if self.logging.eval_every and not self.teacher.is_mixture:
            raise ValueError(_NO_PERIODIC_EVAL)
        return self


# --------------------------------------------------------------------------------------------
# Teacher training


class NetworkSpec(Strict):
    """An architecture preset plus keyword overrides (parameter names as in NVlabs/edm)."""

    arch: Literal["ddpmpp", "ncsnpp", "adm", "mlp", "pulfer-unet"] = "ddpmpp"
    precond: Literal["edm", "vp", "ve"] = "edm"
    sigma_data: PositiveFloat = 0.5
    kwargs: dict[str, Any] = Field(default_factory=dict)


class EDMLoss(Strict):
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2


class TeacherOptim(Strict):
    lr: LearningRate = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup: ImageCount = 10_000_000
    grad_clip: NonNegFloat = 0.0


class TeacherTrainRecipe(_RunCommon):
    kind: Literal["teacher-train"]
    data: DataSpec
    network: NetworkSpec = NetworkSpec()
    loss: EDMLoss = EDMLoss()
    optim: TeacherOptim = TeacherOptim()

    @model_validator(mode="after")
    def _no_periodic_evaluation(self):
        if self.logging.eval_every:
            raise ValueError(_NO_PERIODIC_EVAL)
        return self


class TextEncoderSpec(Strict):
    """The text teacher's encoder: a small CLIP text transformer over a character vocabulary,
    randomly initialized from the recipe's seed and frozen (the UNet learns to read it)."""

    hidden: Width = 32
    layers: Annotated[int, Field(gt=0, le=24)] = 2
    heads: Annotated[int, Field(gt=0, le=64)] = 2
    max_tokens: Annotated[int, Field(ge=8, le=77)] = 32


class DiffusersUNetSpec(Strict):
    """A diffusers UNet2DConditionModel (its constructor's names); in/out channels and sample size
    come from the data, cross_attention_dim from the text encoder."""

    block_out_channels: list[Width] = Field(default_factory=lambda: [32, 64, 64], min_length=1, max_length=6)
    down_block_types: list[str] = Field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = Field(default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    layers_per_block: Annotated[int, Field(gt=0, le=8)] = 1
    attention_head_dim: Annotated[int, Field(gt=0, le=512)] = 8
    norm_num_groups: Annotated[int, Field(gt=0, le=64)] = 8

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need one entry per block_out_channels ({n})")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be a multiple of norm_num_groups ({self.norm_num_groups})"
            )
        return self


class DDPMSchedule(Strict):
    """The discrete noise schedule the text teacher is trained on (diffusers' names)."""

    num_train_timesteps: Annotated[int, Field(ge=10, le=10_000)] = 1000
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"


class TextTeacherTrainRecipe(_RunCommon):
    """A text-conditioned diffusers teacher trained from a labelled dataset: each image's prompt
    is one of its class's phrasings (drawn per sample), replaced by the empty prompt with
    probability prompt_dropout (for classifier-free guidance). Epsilon loss at uniform timesteps,
    as diffusers trains. Saved as a diffusers pipeline directory (RUN/teacher)."""

    kind: Literal["teacher-train-text"]
    data: DataSpec
    prompts: dict[int, list[str]] | None = None  # class -> phrasings; default: emdctl's MNIST phrasings
    prompt_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    unet: DiffusersUNetSpec = DiffusersUNetSpec()
    schedule: DDPMSchedule = DDPMSchedule()
    optim: TeacherOptim = TeacherOptim()

    @model_validator(mode="after")
    def _labelled(self):
        if not self.data.labels:
            raise ValueError("data.labels: a text teacher learns each class's phrasings; the dataset needs labels")
        if self.prompts is not None and any(not v or any(not p.strip() for p in v) for v in self.prompts.values()):
            raise ValueError("prompts: every class needs at least one non-empty phrasing")
        if self.logging.eval_every:
            raise ValueError(_NO_PERIODIC_EVAL)
        return self


Recipe = DistillRecipe | TeacherTrainRecipe | TextTeacherTrainRecipe
RECIPE_KINDS: dict[str, type[BaseModel]] = {
    "distill": DistillRecipe,
    "teacher-train": TeacherTrainRecipe,
    "teacher-train-text": TextTeacherTrainRecipe,
}
