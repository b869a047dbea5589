"""Seed lists as users write them (EDM's syntax), parsed without importing torch, so that the command
line checks its arguments before anything heavy is loaded."""

from __future__ import annotations


def parse_seeds(spec: str) -> list[int]:
    """'0-49999', '0,5,9', '0-9,100-109' -> list of seeds (EDM's syntax)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"seed range {part!r} runs backwards")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError("no seeds given")
    if any(s < 0 for s in out):
        raise ValueError("seeds must be non-negative")
    return out
