"""Song et al.'s DDPM++ / NCSN++ U-Net as configured in EDM ("SongUNet").

Module names (map_noise, map_label, enc['32x32_conv'], dec['4x4_aux_conv'], ...) and shapes match
the official EDM checkpoints. The implementation is emdctl's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


class SongUNet(nn.Module):
    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions=(16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter=(1, 1),
    ):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        blk = dict(
            emb_channels=emb_ch,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_ch, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_ch)
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        self.enc = nn.ModuleDict()
        c = caux = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels, 3, **init)
                c = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, c, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, c, 3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = c
            skip_channels.append(c)
            for i in range(num_blocks):
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, cout, attention=res in attn_resolutions, **blk)
                c = cout
                skip_channels.append(c)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **blk)
            for i in range(num_blocks + 1):
                cin = c + skip_channels.pop()
                c = model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, c, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # DDPM++ orders the embedding [sin | cos]
        if self.map_label is not None:
            y = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([y.shape[0], 1], device=y.device) >= self.label_dropout
                y = y * keep.to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = hidden = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                hidden = block(x)
            elif "aux_conv" in name:
                hidden = block(F.silu(hidden))
                aux = hidden if aux is None else hidden + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
