"""Building blocks of EDM's U-Nets, written for emdctl.

Parameter and buffer names and shapes follow NVlabs/edm's `training/networks.py`, so official
checkpoints map onto these modules one-to-one; the code itself is an independent implementation.
Precision is not handled here: the precision policy (emdctl.precision) wraps forward passes in
autocast, and the preconditioning computes its coefficients in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def init_tensor(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(
        self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1.0, init_bias=0.0
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(init_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(init_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _resample_filter(taps) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional FIR up/downsampling (kernel=0: resampling only)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1.0,
        init_bias=0.0,
    ):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(init_tensor(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(init_tensor([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_filter(resample_filter) if (up or down) else None)

    def forward(self, x):
        w, b, f = self.weight, self.bias, self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if w is not None and self.fused_resample and self.up:
            up = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif w is not None and self.fused_resample and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up = (f * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1).to(x.dtype)
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the (scalar) noise label: [cos | sin]."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        freqs = torch.arange(half, dtype=dtype, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.to(dtype), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = torch.outer(x.to(dtype), 2 * math.pi * self.freqs.to(dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with optional up/downsampling and self-attention (DDPM++, NCSN++ and ADM)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0.0,
        skip_scale=1.0,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.checkpointing = False  # set by the precision policy: recompute activations in backward

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        skip = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(skip) if self.skip is not None else skip)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def _attention(self, h):
        # qkv channels are laid out [head][channel][q|k|v], as in the official checkpoints.
        n, c, hh, ww = h.shape
        heads = self.num_heads
        q, k, v = self.qkv(h).reshape(n, heads, c // heads, 3, hh * ww).unbind(3)
        # [N, heads, C/heads, HW] -> [N, heads, HW, C/heads]; SDPA scales by 1/sqrt(C/heads) like EDM
        # and keeps softmax statistics in float32 (flash attention on GPU).
        a = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return a.transpose(2, 3).reshape(n, c, hh, ww)
