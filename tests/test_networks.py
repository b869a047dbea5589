"""Networks: shapes, official parameter counts, the attention formula, resampling, model directories."""

from __future__ import annotations

import math

import pytest
import torch

from emdctl.errors import UserError
from emdctl.networks import build_denoiser, count_parameters, preset_config
from emdctl.networks.layers import Conv2d, UNetBlock
from emdctl.storage import load_model_dir, load_state_strict
from emdctl.teachers import load_pretrained_denoiser, save_pretrained_denoiser

SMALL = {
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
    "ncsnpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
    "adm": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
}


def small(arch, label_dim=0, res=16, **extra):
    return build_denoiser(preset_config(arch, "edm", (3, res, res), label_dim, {**SMALL[arch], **extra}))


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
@pytest.mark.parametrize("label_dim", [0, 5])
def test_shapes_and_conditioning(arch, label_dim):
    torch.manual_seed(0)
    den = small(arch, label_dim).eval()
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(5)[:3] if label_dim else None
    y = den(x, sigma, labels)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    if label_dim:  # labels reach the output once the zero-initialized output layers are perturbed
        for p in den.parameters():
            p.data += 0.01 * torch.randn_like(p)
        assert not torch.allclose(den(x, sigma, labels), den(x, sigma, torch.eye(5)[[4, 4, 4]]))


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_batch_independence(arch):
    torch.manual_seed(0)
    den = small(arch).eval()
    for p in den.parameters():
        p.data += 0.01 * torch.randn_like(p)
    x, sigma = torch.randn(4, 3, 16, 16), torch.rand(4) + 0.5
    assert torch.allclose(den(x, sigma)[1:3], den(x[1:3], sigma[1:3]), atol=1e-5)


def test_skip_encoder_decoder_variants():
    den = small("ddpmpp", encoder_type="skip", decoder_type="skip")
    assert den(torch.randn(2, 3, 16, 16), 1.0).shape == (2, 3, 16, 16)


def test_official_parameter_counts():
    """The published sizes: ImageNet-64 ADM 295.9M and CIFAR-10 DDPM++ 55.7M parameters."""
    with torch.device("meta"):
        adm = build_denoiser(preset_config("adm", "edm", (3, 64, 64), 1000, {}))
        ddpmpp = build_denoiser(preset_config("ddpmpp", "edm", (3, 32, 32), 10, {"augment_dim": 9}))
    assert count_parameters(adm) == 295_899_267
    assert count_parameters(ddpmpp) == 55_735_299


def test_attention_matches_the_explicit_formula_float64():
    torch.manual_seed(0)
    blk = UNetBlock(64, 64, 32, attention=True, channels_per_head=16).double()
    for p in blk.parameters():
        p.data = torch.randn_like(p) * 0.3
    h = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    got = blk._attention(h)
    # EDM: q, k, v from qkv(h) laid out [head][channel][q|k|v]; w = softmax_k(q.k / sqrt(c)); a = w v
    heads = blk.num_heads
    q, k, v = blk.qkv(h).reshape(2 * heads, 64 // heads, 3, 16).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    ref = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 64, 4, 4)
    assert torch.allclose(got, ref, atol=1e-12)


def test_resampling_filters():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    down = Conv2d(3, 3, 0, down=True).double()
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2))
    up = Conv2d(3, 3, 0, up=True).double()
    assert torch.allclose(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert "resample_filter" in down.state_dict()  # a persistent buffer, as in the official checkpoints


def test_model_directory_round_trip(tmp_path):
    torch.manual_seed(1)
    den = small("ddpmpp", label_dim=3).eval()
    for p in den.parameters():
        p.data += 0.01 * torch.randn_like(p)
    save_pretrained_denoiser(den, tmp_path / "m")
    again = load_pretrained_denoiser(tmp_path / "m").eval()
    x, s, y = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.eye(3)[:2]
    assert torch.equal(den(x, s, y), again(x, s, y))
    cfg, _ = load_model_dir(tmp_path / "m")
    assert cfg["denoiser"]["arch"] == "songunet" and cfg["weights_sha256"]


def test_corrupt_model_directory(tmp_path):
    den = small("adm")
    save_pretrained_denoiser(den, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UserError, match="checksum mismatch"):
        load_pretrained_denoiser(tmp_path / "m")


def test_weights_from_another_architecture_are_refused():
    a, b = small("ddpmpp"), small("adm")
    with pytest.raises(UserError, match="do not fit"):
        load_state_strict(a, b.state_dict(), "other.safetensors")
    c = small("ddpmpp", model_channels=32)
    with pytest.raises(UserError, match="has shape"):
        load_state_strict(a, c.state_dict(), "wider.safetensors")
