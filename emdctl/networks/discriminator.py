"""GDD's discriminator: trainable heads on a frozen feature network (Projected-GAN style).

Features are the sample itself ('input': an MLP head for vectors; for images, one conv head per
level of an image pyramid at full, 1/2 and 1/4 resolution), the frozen teacher U-Net's encoder
('teacher': one conv head on the output of each encoder resolution, the teacher run on the clean
image at a fixed small noise level), or an ImageNet classifier ('efficientnet': torchvision's
EfficientNet-B0 at four strides with Projected GAN's fixed random channel and scale mixing, the
feature network family GDD uses). The forward returns one logit tensor [N, P] per head
(P = patch positions); losses average over positions and sum over heads. Class labels condition
every head by projection (logit += <embed(y), h> / sqrt(C)).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .precond import Denoiser


def diff_augment(x: torch.Tensor, ops, u: torch.Tensor) -> torch.Tensor:
    """Differentiable augmentation of images x [N, C, H, W] (DiffAugment's three families), every
    random choice read from u [N, 7] (uniform on [0, 1), one row per sample, so a sample's
    augmentation depends only on its own draws):
      color: brightness + (u0 - 1/2), saturation x 2 u1 about the channel mean, contrast x (u2 + 1/2)
        about the image mean;
      translation: an integer shift by up to H/8 and W/8 pixels (u3, u4), zeros shifted in;
      cutout: a zeroed H/2 x W/2 square at a position inside the image (u5, u6)."""
    n, _, h, w = x.shape

    def col(i):
        return u[:, i].to(x.dtype).reshape(n, 1, 1, 1)

    if "color" in ops:
        x = x + (col(0) - 0.5)
        x = (x - x.mean(1, keepdim=True)) * (2 * col(1)) + x.mean(1, keepdim=True)
        x = (x - x.mean((1, 2, 3), keepdim=True)) * (col(2) + 0.5) + x.mean((1, 2, 3), keepdim=True)
    if "translation" in ops:
        sh, sw = h // 8, w // 8
        dy = torch.floor(u[:, 3] * (2 * sh + 1)).long() - sh  # uniform on -sh..sh
        dx = torch.floor(u[:, 4] * (2 * sw + 1)).long() - sw
        padded = F.pad(x, (sw, sw, sh, sh))
        rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None] + sh)[:, None, :, None]
        cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None] + sw)[:, None, None, :]
        x = padded.gather(2, rows.expand(n, x.shape[1], h, padded.shape[3]))
        x = x.gather(3, cols.expand(n, x.shape[1], h, w))
    if "cutout" in ops:
        ch, cw = h // 2, w // 2
        y0 = torch.floor(u[:, 5] * (h - ch + 1)).long()[:, None]
        x0 = torch.floor(u[:, 6] * (w - cw + 1)).long()[:, None]
        iy, ix = torch.arange(h, device=x.device)[None, :], torch.arange(w, device=x.device)[None, :]
        inside_y = (iy >= y0) & (iy < y0 + ch)
        inside_x = (ix >= x0) & (ix < x0 + cw)
        keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    return x


class _StopForward(Exception):
    """Raised by the last feature hook: the teacher's decoder is not needed."""


class TeacherEncoderFeatures:
    """The output of the last block of every resolution of a SongUNet/DhariwalUNet encoder.

    The teacher is held by reference, not registered as a submodule: it is frozen and already saved
    elsewhere, so it stays out of the discriminator's state dict and optimizer."""

    def __init__(self, teacher: Denoiser, sigma: float):
        enc = getattr(getattr(teacher, "model", None), "enc", None)
        if not isinstance(enc, nn.ModuleDict):
            arch = type(getattr(teacher, "model", teacher)).__name__
            raise UserError(
                f"method.discriminator.features: 'teacher' needs a SongUNet/DhariwalUNet teacher "
                f"(this one is {arch}); use features: input"
            )
        last: dict[int, str] = {}
        for name in enc:
            m = re.fullmatch(r"(\d+)x\1_block\d+", name)
            if m:
                last[int(m.group(1))] = name
        if not last:
            raise UserError("method.discriminator.features: the teacher's encoder has no U-Net blocks")
        self.names = [last[r] for r in sorted(last, reverse=True)]
        self.teacher, self.sigma = teacher, float(sigma)
        self._out: dict[str, torch.Tensor] = {}
        for name in self.names:
            enc[name].register_forward_hook(self._hook(name, stop=name == self.names[-1]))

    def _hook(self, name: str, stop: bool):
        def hook(_module, _inputs, output):
            if self._out is not None:
                self._out[name] = output
                if stop:
                    raise _StopForward

        return hook

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        self._out = {}
        try:
            self.teacher(x, torch.full((x.shape[0],), self.sigma, device=x.device), labels)
        except _StopForward:
            pass
        out, self._out = self._out, None  # hooks stay silent when the teacher runs as a teacher
        return [out[n].float() for n in self.names]


# torchvision's ImageNet-1k EfficientNet-B0 (top-1 77.7%); the file name carries its sha256 prefix.
EFFICIENTNET_B0_URL = "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth"
EFFICIENTNET_B0_SHA256 = "7f5810bc"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def efficientnet_b0_features(weights: Path | None) -> nn.Sequential:
    """torchvision's EfficientNet-B0 trunk up to stride 32 (features[0:8], 320 channels), frozen, with
    the weights of `weights` (a torchvision state dict: .pth read with weights_only, or .safetensors)
    or, when None, torchvision's ImageNet-1k weights from the download cache (emdctl.hub)."""
    from torchvision.models import efficientnet_b0

    from ..hub import fetch

    path = (
        Path(weights)
        if weights is not None
        else fetch(
            EFFICIENTNET_B0_URL,
            EFFICIENTNET_B0_SHA256,
            what="EfficientNet-B0 ImageNet weights",
            local="method.discriminator.feature_weights",
        )
    )
    if not path.is_file():
        raise UserError(f"method.discriminator.feature_weights: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(
            f"{path}: not a readable state dict ({e.__class__.__name__}); give torchvision's EfficientNet-B0 weights"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict; give torchvision's EfficientNet-B0")
    trunk = efficientnet_b0().features[:8]
    wanted = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    wanted = {k: v for k, v in wanted.items() if int(k.split(".")[0]) < 8}
    try:
        trunk.load_state_dict(wanted, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: not torchvision's EfficientNet-B0 ({first})") from None
    return trunk.requires_grad_(False).eval()


class Fusion(nn.Module):
    """Projected GAN's cross-scale mixing step: add the coarser level's map, upsample x2, 1x1 conv."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class EfficientNetFeatures(nn.Module):
    """Frozen EfficientNet-B0 features for the discriminator heads (Projected GAN, as GDD uses).

    The image (model range [-1, 1], 1 or 3 channels) is mapped to [0, 1], normalized with ImageNet's
    statistics and resized bilinearly to `resolution` (GDD: 224); the trunk's outputs at strides 4,
    8, 16, 32 (24, 40, 112, 320 channels: after features[2], [3], [5], [7], Projected GAN's split)
    are mixed across channels (1x1 convs to c, 2c, 4c, 8c) and across scales (top-down Fusion),
    giving maps of c, c, 2c, 4c channels at strides 2, 4, 8, 16. The mixing convs are random and
    never trained (Projected GAN's fixed projections); they and the trunk are saved with the heads,
    so a resumed run sees the same features. The module stays in eval mode: BatchNorm keeps
    ImageNet's statistics."""

    SPLITS = ((0, 3), (3, 4), (4, 6), (6, 8))
    TRUNK_CHANNELS = (24, 40, 112, 320)

    def __init__(self, resolution: int, channels: int, weights: Path | None):
        super().__init__()
        self.resolution = resolution
        self.trunk = efficientnet_b0_features(weights)
        self.mix = nn.ModuleList(nn.Conv2d(ci, channels << i, 1) for i, ci in enumerate(self.TRUNK_CHANNELS))
        self.fuse = nn.ModuleList(
            [Fusion(channels, channels)] + [Fusion(channels << i, channels << (i - 1)) for i in (1, 2, 3)]
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        stages = []
        for a, b in self.SPLITS:
            for i in range(a, b):
                x = self.trunk[i](x)
            stages.append(x)
        mixed = [conv(h) for conv, h in zip(self.mix, stages, strict=True)]
        out = [None] * 4
        out[3] = self.fuse[3](mixed[3])
        for i in (2, 1, 0):
            out[i] = self.fuse[i](out[i + 1], mixed[i])
        return out


def _pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    out = [x]
    for _ in range(levels - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out


class ConvHead(nn.Module):
    """3x3 conv, then stride-2 4x4 convs down to 4x4 (or the input size), then a 1x1 logit conv."""

    def __init__(self, in_channels: int, channels: int, resolution: int, label_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        while resolution > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            resolution //= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 1, 1)
        self.embed = nn.Linear(label_dim, channels, bias=False) if label_dim else None

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.body(h)
        logit = self.out(h)
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels)[:, :, None, None] * h).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logit.flatten(1)


class MLPHead(nn.Module):
    def __init__(self, in_features: int, hidden: int, layers: int, label_dim: int):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        self.body = nn.Sequential(
            *[m for a, b in itertools.pairwise(dims) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))]
        )
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Linear(label_dim, hidden, bias=False) if label_dim else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.body(x)
        logit = self.out(h)
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * h).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logit


class Discriminator(nn.Module):
    def __init__(self, spec, img_shape: tuple[int, ...], label_dim: int, teacher: Denoiser | None = None):
        super().__init__()
        self.spec, self.img_shape, self.label_dim = spec, tuple(img_shape), label_dim
        self.features = None
        if len(self.img_shape) == 1:
            if spec.features != "input":
                raise UserError("method.discriminator.features: vector data has no feature network; use input")
            self.heads = nn.ModuleList([MLPHead(self.img_shape[0], spec.hidden, spec.layers, label_dim)])
            return
        c, r = self.img_shape[0], self.img_shape[-1]
        if spec.features == "input":
            self.levels = max(1, min(3, int(math.log2(r)) - 2))  # 1/4 resolution at most, never below 4x4
            shapes = [(c, r >> i) for i in range(self.levels)]
        elif spec.features == "efficientnet":
            if c not in (1, 3):
                raise UserError(f"method.discriminator.features: 'efficientnet' reads 1- or 3-channel images, not {c}")
            self.features = EfficientNetFeatures(spec.feature_resolution, spec.channels, spec.feature_weights)
            res = spec.feature_resolution
            ch = spec.channels
            shapes = [(ch, res // 2), (ch, res // 4), (2 * ch, res // 8), (4 * ch, res // 16)]
        else:
            self.features = TeacherEncoderFeatures(teacher, spec.feature_sigma)
            with torch.no_grad():
                probe = torch.zeros(1, *self.img_shape, device=next(teacher.parameters()).device)
                lab = torch.zeros(1, label_dim, device=probe.device) if label_dim else None
                shapes = [(f.shape[1], f.shape[-1]) for f in self.features(probe, lab)]
        self.heads = nn.ModuleList(ConvHead(ci, spec.channels, ri, label_dim) for ci, ri in shapes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        if len(self.img_shape) == 1:
            feats = [x]
        elif self.features is None:
            feats = _pyramid(x, self.levels)
        else:
            feats = self.features(x, labels)
        return [head(f, labels) for head, f in zip(self.heads, feats, strict=True)]

    def config(self) -> dict:
        return {"kind": "discriminator", **self.spec.model_dump(mode="json"), "img_shape": list(self.img_shape)}
