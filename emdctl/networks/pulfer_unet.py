"""The U-Net of Brian Pulfer's DDPM tutorial ("MyUNet"), the architecture of the MNIST teacher in
shared/data/teachers. Re-implemented from its parameter names and shapes (see SOURCES.md).

Its quirk is kept on purpose: every block starts with a LayerNorm over the whole (C, H, W) map,
which hides each image's DC level. That is part of the teacher a faithful distillation reproduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PulferBlock(nn.Module):
    def __init__(self, shape, in_c, out_c, normalize=True):
        super().__init__()
        self.ln = nn.LayerNorm(shape)
        self.conv1 = nn.Conv2d(in_c, out_c, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.normalize = normalize

    def forward(self, x):
        h = self.ln(x) if self.normalize else x
        return F.silu(self.conv2(F.silu(self.conv1(h))))


def _stage(shapes_and_channels, last_normalize=True):
    blocks = [PulferBlock(shape, cin, cout) for shape, cin, cout in shapes_and_channels]
    blocks[-1].normalize = last_normalize
    return nn.Sequential(*blocks)


def _time_mlp(dim_in, dim_out):
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """The tutorial's (slightly unusual) table: sin on even, cos on odd columns, both with the
    even-column frequencies. Only used for fresh networks; checkpoints carry their own table."""
    wk = torch.tensor([1 / 10_000 ** (2 * j / d) for j in range(d)]).reshape(1, d)
    t = torch.arange(n).reshape(n, 1)
    table = torch.zeros(n, d)
    table[:, ::2] = torch.sin(t * wk[:, ::2])
    table[:, 1::2] = torch.cos(t * wk[:, ::2])
    return table


class PulferUNet(nn.Module):
    """epsilon(x_t, t) for 1x28x28 images and integer timesteps t in [0, n_steps)."""

    def __init__(self, n_steps: int = 1000, time_emb_dim: int = 100):
        super().__init__()
        self.time_embed = nn.Embedding(n_steps, time_emb_dim)
        self.time_embed.weight.data = sinusoidal_table(n_steps, time_emb_dim)
        self.time_embed.requires_grad_(False)

        self.te1 = _time_mlp(time_emb_dim, 1)
        self.b1 = _stage([((1, 28, 28), 1, 10), ((10, 28, 28), 10, 10), ((10, 28, 28), 10, 10)])
        self.down1 = nn.Conv2d(10, 10, 4, 2, 1)
        self.te2 = _time_mlp(time_emb_dim, 10)
        self.b2 = _stage([((10, 14, 14), 10, 20), ((20, 14, 14), 20, 20), ((20, 14, 14), 20, 20)])
        self.down2 = nn.Conv2d(20, 20, 4, 2, 1)
        self.te3 = _time_mlp(time_emb_dim, 20)
        self.b3 = _stage([((20, 7, 7), 20, 40), ((40, 7, 7), 40, 40), ((40, 7, 7), 40, 40)])
        self.down3 = nn.Sequential(nn.Conv2d(40, 40, 2, 1), nn.SiLU(), nn.Conv2d(40, 40, 4, 2, 1))
        self.te_mid = _time_mlp(time_emb_dim, 40)
        self.b_mid = _stage([((40, 3, 3), 40, 20), ((20, 3, 3), 20, 20), ((20, 3, 3), 20, 40)])
        self.up1 = nn.Sequential(nn.ConvTranspose2d(40, 40, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(40, 40, 2, 1))
        self.te4 = _time_mlp(time_emb_dim, 80)
        self.b4 = _stage([((80, 7, 7), 80, 40), ((40, 7, 7), 40, 20), ((20, 7, 7), 20, 20)])
        self.up2 = nn.ConvTranspose2d(20, 20, 4, 2, 1)
        self.te5 = _time_mlp(time_emb_dim, 40)
        self.b5 = _stage([((40, 14, 14), 40, 20), ((20, 14, 14), 20, 10), ((10, 14, 14), 10, 10)])
        self.up3 = nn.ConvTranspose2d(10, 10, 4, 2, 1)
        self.te_out = _time_mlp(time_emb_dim, 20)
        self.b_out = _stage(
            [((20, 28, 28), 20, 10), ((10, 28, 28), 10, 10), ((10, 28, 28), 10, 10)], last_normalize=False
        )
        self.conv_out = nn.Conv2d(10, 1, 3, 1, 1)

    def forward(self, x, t):
        emb = self.time_embed(t.long().reshape(-1))

        def bias(te):  # per-channel bias from the time embedding
            return te(emb)[:, :, None, None]

        out1 = self.b1(x + bias(self.te1))
        out2 = self.b2(self.down1(out1) + bias(self.te2))
        out3 = self.b3(self.down2(out2) + bias(self.te3))
        mid = self.b_mid(self.down3(out3) + bias(self.te_mid))
        out4 = self.b4(torch.cat((out3, self.up1(mid)), dim=1) + bias(self.te4))
        out5 = self.b5(torch.cat((out2, self.up2(out4)), dim=1) + bias(self.te5))
        out = self.b_out(torch.cat((out1, self.up3(out5)), dim=1) + bias(self.te_out))
        return self.conv_out(out)
