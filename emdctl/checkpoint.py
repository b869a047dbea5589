"""Training checkpoints: one safetensors file per checkpoint plus a manifest with checksums.

runs/<name>/checkpoints/
    ckpt-000000065536.safetensors   tensors of every network, EMA and optimizer state; the JSON
                                    metadata (iteration, images seen, optimizer hyper-parameters,
                                    architecture configs) sits in the safetensors header
    manifest.json                   [{file, images, iteration, sha256, bytes}], newest last

Files are written atomically (storage.atomic_path) and the manifest only after the file is in
place, so a kill at any moment leaves the previous checkpoint intact. Only the newest `keep` are
kept. Reading uses safetensors and json only: no code from a checkpoint ever runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import UserError
from .storage import (
    atomic_save_safetensors,
    atomic_write_json,
    load_state_strict,
    read_json,
    read_safetensors,
    read_safetensors_metadata,
    sha256_file,
)

FORMAT = "emdctl-checkpoint"
VERSION = 1


def flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    prefix = f"optim.{name}."
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[field] = value
    for pid, fields in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(fields)
    own = opt.state_dict()
    groups = meta["param_groups"]
    if len(groups) != len(own["param_groups"]) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, own["param_groups"], strict=True)
    ):
        raise UserError(f"checkpoint optimizer '{name}' does not match the networks of this recipe")
    # The checkpoint gives the state (moments, step counts); the hyperparameters (lr, betas, eps, ...)
    # stay this recipe's, so `--resume` with a changed recipe trains as that recipe says.
    opt.load_state_dict({"state": state, "param_groups": own["param_groups"]})


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.manifest_path = self.dir / "manifest.json"
        self.keep = keep

    # -- manifest --------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        if not self.manifest_path.exists():
            return []
        data = read_json(self.manifest_path, "checkpoint manifest")
        entries = data.get("checkpoints")
        if data.get("format") != FORMAT or not isinstance(entries, list):
            raise UserError(f"{self.manifest_path}: not an emdctl checkpoint manifest")
        return entries

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write_json(self.manifest_path, {"format": FORMAT, "version": VERSION, "checkpoints": entries})

    def latest(self) -> Path | None:
        entries = self.entries()
        return self.dir / entries[-1]["file"] if entries else None

    # -- save / load -------------------------------------------------------------------------------
    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        images = int(meta["images"])
        name = f"ckpt-{images:012d}.safetensors"
        path = self.dir / name
        header = {"format": FORMAT, "version": VERSION, **meta}
        atomic_save_safetensors(path, tensors, {"emdctl": json.dumps(header)})
        entries = [e for e in self.entries() if e["file"] != name]
        entries.append(
            {
                "file": name,
                "images": images,
                "iteration": int(meta["iteration"]),
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        entries.sort(key=lambda e: e["images"])
        kept, dropped = entries[-self.keep :], entries[: -self.keep]
        self._write_manifest(kept)
        for e in dropped:
            (self.dir / e["file"]).unlink(missing_ok=True)
        return path

    def load(self, path: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise UserError(f"{self.dir}: no checkpoint to resume from")
        return load_checkpoint(path, self.entries() if path.parent == self.dir else None)


def load_checkpoint(path: Path, entries: list[dict] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify (against the manifest when there is one) and read a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file is missing")
    if entries is None:
        manifest = path.parent / "manifest.json"
        entries = read_json(manifest, "checkpoint manifest").get("checkpoints", []) if manifest.exists() else []
    entry = next((e for e in entries if e.get("file") == path.name), None)
    if entry is not None and sha256_file(path) != entry.get("sha256"):
        older = [e["file"] for e in entries if e["images"] < entry["images"]]
        hint = f"; move it away to resume from {older[-1]}" if older else ""
        raise UserError(f"{path}: checksum mismatch with manifest.json (corrupt or truncated checkpoint){hint}")
    tensors = read_safetensors(path, "checkpoint")
    raw = read_safetensors_metadata(path, "checkpoint").get("emdctl")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an emdctl checkpoint (no emdctl metadata in its header)")
    return tensors, meta


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def restore_module(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    load_state_strict(module, sub, f"{source} [{prefix}]")
