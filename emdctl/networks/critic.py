"""The fake score as a discriminator too (SiDA, DMD2): the denoiser plus what its encoder says.

SiDA and DMD2 reuse the fake score network's encoder as the feature extractor of their GAN
discriminator. `FakeScoreCritic` wraps the denoiser, taps the output of its encoder (the
bottleneck: the last encoder block of SongUNet/DhariwalUNet, the middle stage of Pulfer's U-Net,
the last hidden layer of the MLP) and turns it into per-position logits:
  'channel-mean' (SiDA): the mean over channels of the bottleneck, no parameters of its own;
  'conv' (DMD2): a small trained head: conv 4x4 stride 2 -> GroupNorm -> SiLU -> conv over the
      remaining positions -> GroupNorm -> SiLU -> conv 1x1 to one logit (DMD2's classifier branch,
      which at an 8x8 bottleneck is exactly its layer sequence); an MLP head for vector data.
The forward returns D(x; sigma) and, with `features=True`, also the logits [N, P] (one row per
sample, P positions), from the same pass, so the denoising loss and the GAN loss share one forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .mlp import MLP
from .precond import Denoiser
from .pulfer_unet import PulferUNet


def _bottleneck(net: nn.Module) -> tuple[nn.Module, bool]:
    """(module, pre): the module whose output (pre False) or input (pre True) is the bottleneck."""
    enc = getattr(net, "enc", None)
    if isinstance(enc, nn.ModuleDict) and len(enc):
        return list(enc.values())[-1], False
    if isinstance(net, PulferUNet):
        return net.b_mid, False
    if isinstance(net, MLP):
        return net.out, True
    mid = getattr(getattr(net, "model", None), "mid_block", None)
    if mid is not None:  # a diffusers UNet: its middle block (DMD2's classifier reads it there too)
        return mid, False
    raise UserError(
        f"the fake score's network ({type(net).__name__}) has no encoder this method knows how to read "
        "(SongUNet, DhariwalUNet, Pulfer's U-Net, MLP)"
    )


class _Tap:
    """Keeps the bottleneck of the current forward while armed; silent otherwise."""

    def __init__(self, module: nn.Module, pre: bool):
        self.value: torch.Tensor | None = None
        self.armed = False
        if pre:
            module.register_forward_pre_hook(lambda _m, args: self._keep(args[0]))
        else:
            module.register_forward_hook(lambda _m, _args, out: self._keep(out))

    def _keep(self, t):
        if self.armed:
            self.value = t


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ConvLogitHead(nn.Module):
    def __init__(self, channels: int, spatial: int):
        super().__init__()
        c = channels
        after = (spatial + 2 - 4) // 2 + 1 if spatial >= 2 else spatial
        self.down = nn.Conv2d(c, c, 4, 2, 1) if spatial >= 2 else nn.Identity()
        self.norm0 = nn.GroupNorm(_groups(c), c)
        self.pool = nn.Conv2d(c, c, after)
        self.norm1 = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, h):
        h = F.silu(self.norm0(self.down(h)))
        h = F.silu(self.norm1(self.pool(h)))
        return self.out(h).flatten(1)


class MLPLogitHead(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.hidden = nn.Linear(features, features)
        self.out = nn.Linear(features, 1)

    def forward(self, h):
        return self.out(F.silu(self.hidden(h)))


class FakeScoreCritic(nn.Module):
    """The fake score denoiser (`.denoiser`, initialized from the teacher) and its GAN logits."""

    def __init__(self, denoiser: Denoiser, head: str):
        super().__init__()
        if head not in ("channel-mean", "conv"):
            raise ValueError(head)
        self.denoiser = denoiser
        self.head_kind = head
        inner = getattr(denoiser, "model", None) or getattr(denoiser, "network", None)  # DiscreteVP: .network
        module, pre = _bottleneck(inner)
        self._tap = _Tap(module, pre)
        self.head: nn.Module | None = None
        if head == "conv":
            shape = self._bottleneck_shape()
            self.head = ConvLogitHead(shape[0], shape[1]) if len(shape) == 3 else MLPLogitHead(shape[0])

    def _bottleneck_shape(self) -> tuple[int, ...]:
        x = torch.zeros(1, *self.denoiser.img_shape)
        training = self.denoiser.training
        self.denoiser.eval()  # no dropout: the dry run draws no random numbers
        with torch.no_grad():
            _, h = self._forward(x, torch.ones(1), None)
        self.denoiser.train(training)
        return tuple(h.shape[1:])

    def _forward(self, x, sigma, labels):
        self._tap.armed, self._tap.value = True, None
        try:
            d = self.denoiser(x, sigma, labels)
        finally:
            self._tap.armed = False
        h, self._tap.value = self._tap.value, None
        return d, (h if h.dtype == torch.float64 else h.float())  # float32 logits under bf16 autocast

    def forward(self, x, sigma, labels=None, features: bool = False):
        if not features:
            return self.denoiser(x, sigma, labels)
        d, h = self._forward(x, sigma, labels)
        if self.head is None:  # SiDA: the channel mean of the bottleneck, per position
            logits = h.mean(1).flatten(1) if h.ndim == 4 else h.mean(1, keepdim=True)
        else:
            logits = self.head(h)
        return d, logits

    # What the engine asks of a fake score.
    @property
    def img_shape(self):
        return self.denoiser.img_shape

    def dsm_weight(self, sigma):
        return self.denoiser.dsm_weight(sigma)

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)

    def config(self) -> dict:
        return {**self.denoiser.config(), "gan_head": self.head_kind}
