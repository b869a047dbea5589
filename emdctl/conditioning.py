"""What a conditional model is conditioned on, drawn by index.

Every random condition is an index drawn like any other random number (seeded, per global row, so
results do not depend on process count or micro-batching); a `Conditions` object turns indices into
the vectors the networks take: one-hot class labels, or a prompt set's cached text embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError


class Conditions:
    """Unconditional: no index to draw, no vector."""

    count = 0

    def __call__(self, indices: torch.Tensor) -> torch.Tensor | None:
        return None

    def describe(self) -> dict:
        return {"kind": "none"}


class ClassConditions(Conditions):
    def __init__(self, num_classes: int):
        self.count = int(num_classes)

    def __call__(self, indices):
        return torch.nn.functional.one_hot(indices.long(), self.count).float()

    def describe(self):
        return {"kind": "classes", "count": self.count}


class PromptConditions(Conditions):
    """A prompt set: one flat embedding row per prompt (held on the CPU; a batch's rows move to the
    device it is drawn on), and the unconditional row (the empty prompt's, or the pipeline's zeros)."""

    def __init__(self, prompts: list[str], table: torch.Tensor, uncond: torch.Tensor, source: str = ""):
        self.prompts, self.table, self.uncond, self.source = list(prompts), table, uncond.reshape(-1), source
        self.count = len(self.prompts)

    def __call__(self, indices):
        return self.table[indices.long().cpu()].to(indices.device, torch.float32)

    def describe(self):
        return {"kind": "prompts", "count": self.count, "source": self.source, "width": int(self.table.shape[1])}


def read_prompts(path: Path, what: str = "data.prompts") -> list[str]:
    """A prompt file: plain text, one prompt per line, or JSONL with a `prompt` field per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path}: no such prompt file")
    if path.suffix.lower() == ".jsonl":
        prompts = jsonl_strings(path, "prompt", what)
    else:
        prompts = [line.strip() for line in _text_lines(path, what) if line.strip()]
    if not prompts:
        raise UserError(f"{what}: {path} holds no prompts (one per line, or JSONL with a 'prompt' field)")
    return prompts


def jsonl_strings(path: Path, field: str, what: str) -> list[str]:
    """The string `field` of every non-blank line of a JSONL file, in order (errors name the line)."""
    out = []
    for i, line in enumerate(_text_lines(Path(path), what), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: {path} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UserError(f"{what}: {path} line {i}: needs a string field '{field}'")
        out.append(row[field])
    return out


def _text_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{what}: {path}: not UTF-8 text") from None
