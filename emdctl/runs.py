"""Run directories: `runs/<name>/` holds everything a run produces.

    recipe.yaml        the fully resolved recipe (every default filled in)
    metrics.jsonl      one JSON object per logging interval
    checkpoints/       see emdctl.checkpoint
    grids/             periodic PNG previews
    generator/         the final (EMA) generator as a model directory

Re-running the same command resumes the run. A different recipe for an existing directory is
refused unless --resume (continue with the new recipe; the old one is kept as recipe.<time>.yaml)
or --force (the old directory is moved aside, never deleted).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import dump_recipe, parse_recipe, recipe_to_dict
from .storage import DirectoryLock, atomic_write, move_aside


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


# Fields that change no result: a run may be resumed with another value.
RESULT_NEUTRAL = {"threads"}


def recipe_differences(old: dict, new: dict) -> list[str]:
    """The fields whose values differ. The old recipe is first resolved by the current schema, so a
    field added to emdctl since the run started is no difference while it keeps its default."""
    try:
        old = recipe_to_dict(parse_recipe(old, "the run's recipe.yaml"))
    except UserError:
        pass  # written by another version that this one cannot read: compare as written
    a, b = _flatten(old), _flatten(new)
    keys = sorted((set(a) | set(b)) - RESULT_NEUTRAL)
    return [f"{k}: {a.get(k, '-')!r} -> {b.get(k, '-')!r}" for k in keys if a.get(k) != b.get(k)]


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock: DirectoryLock | None = None

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    def lock(self) -> None:
        """Held while a command uses the run (see storage.DirectoryLock)."""
        self._lock = DirectoryLock(self.root, "run directory")
        self._lock.acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- metrics -----------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill; the rest is intact
        return out

    def truncate_metrics(self, images: int) -> None:
        """Drop records written after the checkpoint a resumed run restarts from."""
        if self.metrics_file.exists():
            kept = [r for r in self.read_metrics() if r.get("images", 0) <= images]
            atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))


def prepare(recipe, run: RunDir, resume: bool = False, force: bool = False) -> RunDir:
    """Create or reopen the run directory for `recipe`, enforcing the resume rules. The caller holds
    the run's lock (RunDir.lock), so nothing here races another process."""
    root = run.root
    new = recipe_to_dict(recipe)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory")
    if run.recipe_file.exists():
        try:
            old = yaml.safe_load(run.recipe_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            old = None
        diffs = recipe_differences(old or {}, new)
        if diffs and force:
            print(f"moved the previous run aside to {move_aside(root)}")
        elif diffs and resume:
            atomic_write(root / f"recipe.{time.strftime('%Y%m%d-%H%M%S')}.yaml", run.recipe_file.read_text())
        elif diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise UserError(
                f"{root} holds a run with a different recipe ({shown}); pass --resume to continue it with this "
                f"recipe, --force to move it aside and start over, or choose another --run-dir"
            )
    elif force and root.exists() and any(root.iterdir()):
        print(f"moved the previous run aside to {move_aside(root)}")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(run.recipe_file, dump_recipe(recipe))
    return run


def newest_finished_run(runs_root: Path = Path("runs")) -> Path:
    """The run under runs_root that finished last (its summary.json and generator/ written)."""
    done = [p.parent for p in Path(runs_root).glob("*/summary.json") if (p.parent / "generator").is_dir()]
    if not done:
        raise UserError(
            f"no source given and no finished run under {runs_root}/; give a run or model directory "
            "(e.g. runs/default after `emdctl distill`)"
        )
    return max(done, key=lambda d: (d / "summary.json").stat().st_mtime)
