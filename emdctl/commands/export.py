"""`emdctl export`: the generator as a safetensors model directory, or a portable ONNX/TorchScript
module (emdctl.export holds the portable module and its checks)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UserError
from ..export import FORMATS, PortableGenerator, _example_inputs, export_onnx, verify_onnx
from ..generator import OneStepGenerator
from ..sampling import open_generator
from ..storage import atomic_path, atomic_write_json, sha256_file


def export_command(*, source: Path, fmt: str, out: Path, use_ema: bool = True, lora_file: bool = False) -> dict:
    if fmt not in FORMATS:
        raise UserError(f"export format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if lora_file and fmt != "diffusers":
        raise UserError("--lora is for --format diffusers")
    gen, cfg = open_generator(source, use_ema)
    if not isinstance(gen, OneStepGenerator):
        raise UserError(f"{source}: already an ONNX/TorchScript export; export its run or safetensors directory")
    gen = gen.cpu().eval()
    if fmt == "diffusers":
        from ..export_diffusers import export_diffusers

        return export_diffusers(gen, cfg, out, lora_file)
    z, labels = _example_inputs(gen, 4)
    with torch.no_grad():
        probe = PortableGenerator(gen, is_image=False)(z, labels)
    if not bool(torch.isfinite(probe).all()):
        raise UserError(f"{source}: the generator gives non-finite samples (it diverged); export an earlier checkpoint")
    data = cfg.get("data", {})
    is_image = data.get("kind", "image" if len(gen.img_shape) == 3 else "vector") == "image"
    out = Path(out)
    info = {
        "format": "emdctl-export",
        "kind": "generator",
        "source": str(source),
        "ema": use_ema,
        "z_size": math.prod(gen.img_shape) * gen.steps,
        "z_shape": list(gen.img_shape),
        "z_type": "normal",
        "num_classes": gen.label_dim,
        "resolution": gen.img_shape[-1] if is_image else None,
        "channels": gen.img_shape[0] if is_image else None,
        "sigma_star": gen.sigma_star,
        "steps": gen.steps,
        "levels": gen.levels,
        "sampler": gen.sampler,
        "data": data,
        "teacher": cfg.get("teacher") or {},
        "output": "uint8 NCHW in [0, 255]" if is_image else "float32 [B, D]",
    }
    if fmt == "safetensors":
        # The teacher's description travels with the weights, as in the run's own generator/:
        # provenance, and what `emdctl evaluate modes` needs to find a mixture's true modes.
        provenance = {k: cfg[k] for k in ("teacher", "method") if cfg.get(k)}
        gen.save_pretrained(out, data, {**provenance, "exported_from": str(source), "ema": use_ema})
        return {"path": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    portable = PortableGenerator(gen, is_image).eval()
    if fmt == "onnx":
        path = out / "generator.onnx"
        export_onnx(portable, gen, path)
        info["file"] = path.name
        info["verified"] = verify_onnx(portable, gen, path)
    else:
        path = out / "generator.pth"  # torch-fidelity loads .pth files as TorchScript
        z, labels = _example_inputs(gen)
        with torch.no_grad():
            traced = torch.jit.trace(portable, (z, labels) if labels is not None else (z,), check_trace=False)
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
        info["file"] = path.name
    info["file_sha256"] = sha256_file(path)
    atomic_write_json(out / "config.json", info)
    return {"path": str(path), **({"verified": info.get("verified")} if fmt == "onnx" else {})}
