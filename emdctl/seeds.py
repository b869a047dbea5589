"""Seed lists as users write them (EDM's syntax: '0-49999', '0,5,9', '0-9,100-109'), parsed without
importing torch, so that the command line checks its arguments before anything heavy is loaded.

A seed list is a sequence of integer ranges, never materialized: `--seeds 0-999999999999` costs a few
bytes, and sampling walks it a block at a time, so its memory does not grow with the count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

MAX_SPEC = 100_000  # characters of a --seeds value


class Seeds(Sequence):
    """An immutable sequence of seeds made of ranges; slices come back as lists (callers take a
    batch or a block at a time)."""

    def __init__(self, ranges: Sequence[range]):
        self.ranges = [r for r in ranges if len(r)]
        self._starts = []
        total = 0
        for r in self.ranges:
            self._starts.append(total)
            total += len(r)
        self._len = total

    @classmethod
    def first(cls, n: int) -> Seeds:
        return cls([range(n)])

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for r in self.ranges:
            yield from r

    def _at(self, i: int) -> int:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        lo, hi = 0, len(self.ranges) - 1
        while lo < hi:  # the last range starting at or before i
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return self.ranges[lo][i - self._starts[lo]]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                raise ValueError("seed lists are sliced in steps of 1")
            return [self._at(i) for i in range(start, stop)]
        return self._at(key)

    def __eq__(self, other) -> bool:
        if isinstance(other, Seeds):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented if not isinstance(other, list) else list(self) == other

    def digest(self) -> str:
        """The same for the same seeds in the same order, however written ('0-2' and '0,1,2')."""
        h = hashlib.sha256()
        merged: list[list[int]] = []
        for r in self.ranges:
            if merged and merged[-1][1] == r.start and r.step == 1:
                merged[-1][1] = r.stop
            else:
                merged.append([r.start, r.stop])
        for a, b in merged:
            h.update(f"{a}-{b};".encode())
        return h.hexdigest()

    def describe(self) -> str:
        return f"{len(self):,} seeds from {self[0]} to {self[-1]}" if len(self) else "no seeds"


def parse_seeds(spec: str) -> Seeds:
    """'0-49999', '0,5,9', '0-9,100-109' -> Seeds (EDM's syntax)."""
    spec = str(spec)
    if len(spec) > MAX_SPEC:
        raise ValueError(f"a seed list of {len(spec):,} characters; write ranges, e.g. 0-49999")
    ranges: list[range] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError(f"seed range {part!r} runs backwards")
                ranges.append(range(lo, hi + 1))
            else:
                lo = int(part)
                ranges.append(range(lo, lo + 1))
        except ValueError as e:
            raise ValueError(str(e) if "backwards" in str(e) else f"{part!r} is not a seed or a range a-b") from None
        if lo < 0:
            raise ValueError("seeds must be non-negative")
    if not ranges:
        raise ValueError("no seeds given")
    if any(r.stop > 2**63 for r in ranges):
        raise ValueError("seeds must be below 2^63")
    return Seeds(ranges)
