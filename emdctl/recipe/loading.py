"""Reading recipes: the bounded YAML reader, `--set` overrides, validation into the schema, and the
resolved dump written beside every run."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .messages import format_validation_error
from .schema import RECIPE_KINDS, Recipe

# --------------------------------------------------------------------------------------------
# Loading


DEFAULT_RECIPE_PATH = Path(__file__).parent.parent / "default_recipe.yaml"


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; this bounds what a reader holds
MAX_RECIPE_NODES = 100_000  # after aliases are expanded (an alias bomb expands exponentially)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1}); give each field once", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict, source: str) -> int:
    """Nodes of the document with every alias expanded (shared nodes counted each time); an alias
    inside its own anchor (a structure containing itself) is refused."""
    key = id(node)
    if key in memo:
        if memo[key] is None:
            raise UserError(f"{source}: an alias refers to a node that contains it; write the value out")
        return memo[key]
    memo[key] = None  # in progress
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(c, memo, source) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, source) + _expanded_size(v, memo, source) for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_RECIPE_NODES + 1)
    return memo[key]


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> data, bounded: size, nesting depth, alias expansion; duplicate keys refused."""
    if len(text) > MAX_RECIPE_BYTES:
        raise UserError(f"{source}: {len(text):,} characters; a recipe is at most {MAX_RECIPE_BYTES:,}")
    try:
        loader = _RecipeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}, source) > MAX_RECIPE_NODES:
                raise UserError(
                    f"{source}: expands to more than {MAX_RECIPE_NODES:,} values (aliases referring to aliases?); "
                    "write the recipe out"
                )
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a recipe") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise UserError(f"{source}: a value cannot be read ({str(e)[:100]})") from None


def read_yaml(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such recipe file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML recipe file")
    if not path.is_file():  # a device (/dev/zero), a FIFO, a socket: it may never end
        raise UserError(f"{path}: not a regular file; give a YAML recipe file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the recipe ({e.__class__.__name__}: {e})") from None
    return parse_yaml(text, str(path))


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (numbers, booleans, lists)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr_gen=2e-6")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
            raise UserError(f"--set {item!r}: {key!r} is not a dotted field path like method.langevin.steps")
        try:
            value = parse_yaml(raw, f"--set {key}") if raw.strip() else None
        except UserError as e:
            if "malformed YAML" not in e.message:
                raise
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section in {source}")
            node = child
        node[parts[-1]] = value
    return data


def parse_recipe(data: Any, source: str, default_name: str | None = None) -> Recipe:
    """Validate raw recipe data; `source` names where it came from in error messages."""
    if data is None:
        raise UserError(f"{source}: the recipe is empty")
    if not isinstance(data, dict):
        raise UserError(f"{source}: the recipe must be a mapping of sections, got {type(data).__name__}")
    kind = data.get("kind", "distill")
    if not isinstance(kind, str) or kind not in RECIPE_KINDS:
        raise UserError(f"{source}: kind: unknown value {kind!r} (allowed: {', '.join(RECIPE_KINDS)})")
    cls = RECIPE_KINDS[kind]
    try:
        recipe = cls.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, data, cls)) from None
    if recipe.name is None and default_name:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", default_name).lstrip("-._") or "run"
        recipe = recipe.model_copy(update={"name": name})
    return recipe


def load_recipe(path: Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the embedded default when `path` is None) and apply overrides."""
    src_path = DEFAULT_RECIPE_PATH if path is None else Path(path)
    data = read_yaml(src_path)
    source = "default recipe" if path is None else str(src_path)
    if overrides:
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{source}: the recipe must be a mapping of sections")
        data = apply_overrides(data or {}, overrides, source)
        source = f"{source} (with --set {', '.join(overrides)})"
    return parse_recipe(data, source, default_name=src_path.stem)


def recipe_to_dict(recipe: BaseModel) -> dict:
    return recipe.model_dump(mode="json")


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
