"""A small residual MLP denoiser for low-dimensional data (the analytic-mixture problems)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layers import PositionalEmbedding


class MLP(nn.Module):
    """F(x, c_noise): residual SiLU blocks, the noise embedding added to every block."""

    def __init__(self, in_features: int, hidden: int = 256, layers: int = 4, emb_dim: int = 64, label_dim: int = 0):
        super().__init__()
        self.map_noise = PositionalEmbedding(emb_dim, endpoint=True)
        self.map_emb = nn.Linear(emb_dim, hidden)
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, in_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = F.silu(self.map_emb(self.map_noise(noise_labels)))
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels)
        h = self.inp(x)
        for block, proj in zip(self.blocks, self.emb_proj, strict=True):
            h = h + block(F.silu(h + proj(emb)))
        return self.out(F.silu(h))
