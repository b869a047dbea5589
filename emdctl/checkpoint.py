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
import os
import re
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
        self.notes: list[str] = []  # what was repaired on the way (the trainer prints them)

    # -- manifest --------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        if not self.manifest_path.exists():
            return self._rebuild_manifest()
        data = read_json(self.manifest_path, "checkpoint manifest")
        entries = data.get("checkpoints")
        if data.get("format") != FORMAT or not isinstance(entries, list):
            raise UserError(f"{self.manifest_path}: not an emdctl checkpoint manifest")
        for e in entries:
            if not (
                isinstance(e, dict)
                and isinstance(e.get("file"), str)
                and isinstance(e.get("images"), int)
                and isinstance(e.get("sha256"), str)
                and re.fullmatch(r"ckpt-\d{12}\.safetensors", e["file"])
            ):
                raise UserError(
                    f"{self.manifest_path}: an entry lacks a valid file, images or sha256 ({str(e)[:80]}); "
                    "remove the manifest to rebuild it from the checkpoint files"
                )  # fmt: skip
        return entries

    def _rebuild_manifest(self) -> list[dict]:
        """A run whose manifest was deleted: rebuilt from the checkpoint files that read back whole
        (never a silent restart over them)."""
        files = sorted(self.dir.glob("ckpt-*.safetensors")) if self.dir.is_dir() else []
        if not files:
            return []
        entries, unreadable = [], []
        for f in files:
            try:
                _, meta = load_checkpoint(f, entries=[])
            except UserError:
                unreadable.append(f.name)
                continue
            entries.append(self._entry(f, meta))
        if not entries:
            raise UserError(
                f"{self.dir}: manifest.json is missing and no checkpoint file reads back whole "
                f"({', '.join(unreadable)}); move the folder away to start over"
            )
        entries.sort(key=lambda e: e["images"])
        self._write_manifest(entries)
        skipped = f" (unreadable, left in place: {', '.join(unreadable)})" if unreadable else ""
        self.notes.append(f"{self.manifest_path}: was missing; rebuilt from {len(entries)} checkpoint file(s){skipped}")
        return entries

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write_json(self.manifest_path, {"format": FORMAT, "version": VERSION, "checkpoints": entries})

    def latest(self) -> Path | None:
        entries = self.entries()
        return self.dir / entries[-1]["file"] if entries else None

    @staticmethod
    def _entry(path: Path, meta: dict) -> dict:
        return {
            "file": path.name,
            "images": int(meta["images"]),
            "iteration": int(meta["iteration"]),
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    # -- save / load -------------------------------------------------------------------------------
    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        images = int(meta["images"])
        name = f"ckpt-{images:012d}.safetensors"
        path = self.dir / name
        header = {"format": FORMAT, "version": VERSION, **meta}
        atomic_save_safetensors(path, tensors, {"emdctl": json.dumps(header)})
        entries = [e for e in self.entries() if e["file"] != name]
        entries.append(self._entry(path, meta))
        entries.sort(key=lambda e: e["images"])
        kept, dropped = entries[-self.keep :], entries[: -self.keep]
        self._write_manifest(kept)
        for e in dropped:
            (self.dir / e["file"]).unlink(missing_ok=True)
        return path

    def load(self, path: Path | None = None, repair: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """A given checkpoint, or the newest one that verifies: a newer one that fails its checksum
        (or is missing) is, with `repair` (the run's own process, holding its lock), moved aside into
        checkpoints/damaged/ and left out of the manifest; `notes` says so either way."""
        if path is not None:
            path = Path(path)
            return load_checkpoint(path, self.entries() if path.parent == self.dir else None)
        entries = self.entries()
        if not entries:
            raise UserError(f"{self.dir}: no checkpoint to resume from")
        for i in range(len(entries) - 1, -1, -1):
            candidate = self.dir / entries[i]["file"]
            try:
                loaded = load_checkpoint(candidate, entries)
            except UserError as e:
                if i == 0:
                    raise UserError(f"{e.message}; no older checkpoint verifies either") from None
                self._set_aside(candidate, entries[i], repair)
                continue
            if i < len(entries) - 1 and repair:
                self._write_manifest(entries[: i + 1])
            self.loaded = candidate
            return loaded
        raise AssertionError("unreachable")

    def _set_aside(self, path: Path, entry: dict, repair: bool) -> None:
        aside = None
        if path.is_file() and repair:
            (self.dir / "damaged").mkdir(exist_ok=True)
            aside = self.dir / "damaged" / path.name
            os.replace(path, aside)
        where = f"moved to {aside}" if aside else ("left in place" if path.is_file() else "its file is missing")
        self.notes.append(f"{path.name} (images {entry['images']:,}) does not verify ({where}); using an older one")


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
        raise UserError(f"{path}: checksum mismatch with manifest.json (corrupt or truncated checkpoint)")
    tensors = read_safetensors(path, "checkpoint")
    raw = read_safetensors_metadata(path, "checkpoint").get("emdctl")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an emdctl checkpoint (no emdctl metadata in its header)")
    return tensors, meta


def module_tensors(prefix: str, module: torch.nn.Module, skip: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """A module's tensors under PREFIX.name, but for those in `skip` (by data_ptr: a LoRA student's
    frozen base, which is the teacher's own tensor and comes back with the teacher)."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items() if v.data_ptr() not in skip}


def restore_module(
    prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, skip: frozenset = frozenset()
) -> None:
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    for k, v in module.state_dict().items():
        if v.data_ptr() in skip and k not in sub:
            sub[k] = v  # not checkpointed: the teacher's tensor, in place already
    load_state_strict(module, sub, f"{source} [{prefix}]")
