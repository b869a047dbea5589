"""`emdctl export`: the generator as a self-contained, portable artifact.

* safetensors: a model directory (model.safetensors + config.json) that `emdctl sample` loads
  without the recipe or the teacher;
* onnx / torchscript: a module z -> image with z flattened to [B, z_size] (and integer class
  labels [B] for conditional models), returning uint8 NCHW images (vectors stay float32): the
  interface of torch-fidelity's generative-model inputs. A few-step generator's z is its latent
  followed by the unit noise of each later step (z_size = steps x image size), so the exported
  sampler is a function of its inputs alone. ONNX files are checked against torch with
  onnxruntime when it is installed.

`ExportedGenerator` reads an ONNX or TorchScript export back, so `emdctl sample` and `emdctl
evaluate` take those directories like a safetensors export (the same pixels per seed, within the
runtimes' rounding). A TorchScript file is a program: it is loaded only when its sha256 matches the one
its export recorded in config.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .generator import OneStepGenerator
from .storage import atomic_path, sha256_file

FORMATS = ("safetensors", "onnx", "torchscript", "diffusers")


class PortableGenerator(nn.Module):
    """z [B, z_size] (+ labels [B]) -> uint8 images [B, C, H, W] (or float vectors), sampled with
    the generator's trained steps; z holds the latent, then each later step's noise."""

    def __init__(self, gen: OneStepGenerator, is_image: bool):
        super().__init__()
        self.gen = gen
        self.is_image = is_image
        self.z_shape = tuple(gen.img_shape)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = z.reshape(z.shape[0], self.gen.steps, *self.z_shape)
        y = None
        if self.gen.label_dim:
            y = torch.nn.functional.one_hot(labels.long(), self.gen.label_dim).to(z.dtype)
        x = self.gen.sample(z[:, 0], y, noises=list(z[:, 1:].unbind(1)))
        if not self.is_image:
            return x
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _example_inputs(gen: OneStepGenerator, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, math.prod(gen.img_shape) * gen.steps, generator=g)
    labels = torch.randint(gen.label_dim, (batch,), generator=g) if gen.label_dim else None
    return z, labels


def export_onnx(portable: PortableGenerator, gen: OneStepGenerator, path: Path) -> None:
    """torch.export-based ONNX export with a dynamic batch dimension."""
    z, labels = _example_inputs(gen)
    batch = torch.export.Dim("batch", min=1, max=65536)
    if labels is not None:
        args, names, shapes = (z, labels), ["z", "labels"], ({0: batch}, {0: batch})
    else:
        args, names, shapes = (z,), ["z"], ({0: batch},)
    try:
        with atomic_path(path) as tmp:
            torch.onnx.export(
                portable,
                args,
                str(tmp),
                input_names=names,
                output_names=["images"],
                dynamic_shapes=shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except ImportError as e:
        raise UserError(
            f"ONNX export needs the onnx and onnxscript packages ({e}); pip install 'emdctl[onnx]'"
        ) from None


def verify_onnx(portable: PortableGenerator, gen: OneStepGenerator, path: Path, batch: int = 3) -> dict | None:
    """Compare onnxruntime's outputs with torch's on fresh inputs; None if onnxruntime is absent."""
    try:
        import onnxruntime
    except ImportError:
        return None
    z, labels = _example_inputs(gen, batch)
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"z": z.numpy()}
    if labels is not None:
        feeds["labels"] = labels.numpy()
    got = torch.from_numpy(sess.run(None, feeds)[0])
    with torch.no_grad():
        want = portable(z, labels)
    diff = (got.float() - want.float()).abs()
    tol = 1.0 if want.dtype == torch.uint8 else 1e-4 * (1 + float(want.abs().max()))
    report = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "tolerance": tol}
    if report["max_abs_diff"] > tol:
        raise UserError(f"{path}: ONNX outputs differ from torch by {report['max_abs_diff']} (> {tol})")
    return report


class ExportedGenerator(nn.Module):
    """An ONNX or TorchScript export read back, with OneStepGenerator's sampling interface: its
    trained step count only; images come back as uint8 (what the export computes), vectors as float."""

    def __init__(self, directory: Path, config: dict):
        super().__init__()
        self.directory, self.config = Path(directory), config
        try:
            self.img_shape = tuple(int(v) for v in config["z_shape"])
            self.label_dim = int(config.get("num_classes") or 0)
            self.steps = int(config["steps"])
            self.levels, self.sampler = list(config["levels"]), config.get("sampler", "renoise")
            self.sigma_star = float(config["sigma_star"])
            file = self.directory / str(config["file"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.directory / 'config.json'}: not a complete export config ({e})") from None
        if not file.is_file():
            raise UserError(f"{file}: missing; re-export the generator")
        want = config.get("file_sha256")
        if want is None or sha256_file(file) != want:
            raise UserError(f"{file}: its sha256 does not match config.json's file_sha256; re-export the generator")
        if file.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise UserError(f"{file}: reading ONNX needs onnxruntime; pip install 'emdctl[onnx]'") from None
            self._session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
            self._module = None
        else:
            self._session = None
            try:
                self._module = torch.jit.load(str(file), map_location="cpu").eval()
            except (RuntimeError, ValueError) as e:
                raise UserError(f"{file}: not a readable TorchScript export ({str(e).splitlines()[0][:120]})") from None
        self._device = torch.device("cpu")

    def to(self, device=None, *args, **kwargs):
        self._device = torch.device(device) if device is not None else self._device
        return self

    def sampling_levels(self, steps: int | None = None) -> list[float]:
        if steps is not None and steps != self.steps:
            raise UserError(
                f"{self.directory}: an exported generator samples with its trained {self.steps} step(s) only; "
                f"drop --steps or sample the run directory"
            )
        return self.levels

    @torch.no_grad()
    def sample(self, z, labels=None, steps: int | None = None, rng=None, noises=None):
        self.sampling_levels(steps)
        if noises is None:
            noises = [rng.randn(tuple(z.shape[1:])) for _ in self.levels[1:]] if self.steps > 1 else []
        flat = torch.cat([z.cpu().flatten(1)] + [n.cpu().flatten(1) for n in noises], dim=1).float()
        idx = labels.argmax(1).cpu() if labels is not None else None
        if self._session is not None:
            feeds = {"z": flat.numpy()}
            if idx is not None:
                feeds["labels"] = idx.numpy()
            x = torch.from_numpy(self._session.run(None, feeds)[0])
        else:
            x = self._module(flat, idx) if idx is not None else self._module(flat)
        return x.to(self._device)
