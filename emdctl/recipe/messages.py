"""Validation errors as one readable line per problem: `<file>: <field.path>: <what is wrong>
(allowed: ...)`, whatever pydantic's location and type."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

# --------------------------------------------------------------------------------------------
# Error messages


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation admits (Optional/Union/Annotated removed)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out = []
        for a in typing.get_args(annotation):
            out += _unwrap(a)
        return out
    return [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _walk(model: type[BaseModel], loc: tuple, data: Any) -> tuple[str, type[BaseModel] | None, Any]:
    """Turn a pydantic error location into a dotted path, the model that owns the last field,
    and the data of that model. Discriminator tags that pydantic inserts into `loc` are skipped."""
    path: list[str] = []
    current: Any = model
    node = data
    owner, owner_data = model, data
    i = 0
    while i < len(loc):
        part = loc[i]
        if _is_model(current) and isinstance(part, str) and part in current.model_fields:
            owner, owner_data = current, node
            field = current.model_fields[part]
            path.append(part)
            node = node.get(part) if isinstance(node, dict) else None
            candidates = [c for c in _unwrap(field.annotation) if c is not type(None)]
            models = [c for c in candidates if _is_model(c)]
            if field.discriminator and len(models) > 1:
                tag = node.get(field.discriminator) if isinstance(node, dict) else None
                chosen = [m for m in models if tag in _literal_values(m, field.discriminator)]
                current = chosen[0] if chosen else None
                if i + 1 < len(loc) and loc[i + 1] == tag:
                    i += 1  # pydantic puts the tag itself into the location
            elif len(models) == 1:
                current = models[0]
            else:
                current = candidates[0] if len(candidates) == 1 else None
        elif isinstance(part, int):
            path[-1:] = [f"{path[-1]}[{part}]"] if path else [f"[{part}]"]
            node = node[part] if isinstance(node, list) and part < len(node) else None
            args = typing.get_args(current) if current is not None else ()
            current = args[0] if args else None
            models = [c for c in _unwrap(current) if _is_model(c)] if current is not None else []
            current = models[0] if len(models) == 1 else current
        else:
            path.append(str(part))
            owner, owner_data = (current if _is_model(current) else None), node
            node = node.get(part) if isinstance(node, dict) else None
            current = None
        i += 1
    return ".".join(path), owner, owner_data


def _literal_values(model: type[BaseModel], field_name: str) -> list[Any]:
    field = model.model_fields.get(field_name)
    if field is None:
        return []
    return list(typing.get_args(field.annotation))


def format_validation_error(err: ValidationError, source: str, data: Any, model: type[BaseModel]) -> str:
    """One line per problem: `<file>: <field.path>: <what is wrong> (allowed: ...)`."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path, owner, _ = _walk(model, loc, data)
        kind = e["type"]
        ctx = e.get("ctx") or {}
        given = e.get("input")
        if kind == "extra_forbidden":
            allowed = ", ".join(owner.model_fields) if owner is not None else ""
            parent = path.rsplit(".", 1)[0] if "." in path else "top level"
            msg = f"unknown field in {parent}" + (f" (allowed: {allowed})" if allowed else "")
        elif kind == "union_tag_invalid":
            tags = ctx.get("expected_tags", "")
            msg = f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {ctx.get('tag')!r} (allowed: {tags})"
        elif kind == "union_tag_not_found":
            msg = f"missing the field {ctx.get('discriminator', '')} that says which kind this is"
        elif kind == "literal_error":
            msg = f"got {given!r}; allowed values: {ctx.get('expected', '')}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", e["msg"]))
        else:
            text = e["msg"][0].lower() + e["msg"][1:] if e["msg"] else kind
            shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
            msg = f"{text} (got {shown})"
        line = f"{source}: {path or 'top level'}: {msg}"
        # A key or value with control characters (a "\r" key) must not break the one-line format.
        lines.append("".join(c if c.isprintable() else repr(c)[1:-1] for c in line))
    return "\n".join(lines)
