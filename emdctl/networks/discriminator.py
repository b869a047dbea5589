"""GDD's discriminator: trainable heads on a frozen feature network (Projected-GAN style).

Features are either the sample itself ('input': an MLP head for vectors; for images, one conv head
per level of an image pyramid at full, 1/2 and 1/4 resolution) or the frozen teacher U-Net's
encoder ('teacher': one conv head on the output of each encoder resolution, the teacher run on the
clean image at a fixed small noise level). The forward returns one logit tensor [N, P] per head
(P = patch positions); losses average over positions and sum over heads. Class labels condition
every head by projection (logit += <embed(y), h> / sqrt(C)).
"""

from __future__ import annotations

import itertools
import math
import re

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
