"""Progress of every phase that can take more than a few seconds.

On a terminal: a rich bar with the count, the rate (images/s, steps/s, ...) and the time left. Not on
a terminal (a log file, CI): plain lines, one at the start, one every `every_s` seconds and one at the
end, each with the count and the rate, instead of hundreds of carriage-return updates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text


class RateColumn(ProgressColumn):
    """The task's rate in its own unit (rich's speed estimate over the last updates)."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "it")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {unit}/s")


def rich_bar(console: Console) -> RichProgress:
    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class Progress:
    """`with Progress(total, "features", "img") as p: ... p.advance(n)`; see the module docstring."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "img",
        console: Console | None = None,
        enabled: bool = True,
        every_s: float = 15.0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.enabled, self.every_s = enabled, every_s
        self.done = 0
        self._bar: RichProgress | None = None
        self._task = None

    def __enter__(self) -> Progress:
        self._t0 = self._last = time.monotonic()
        if not self.enabled:
            return self
        if self.console.is_terminal:
            self._bar = rich_bar(self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.desc, total=self.total, unit=self.unit)
        else:
            of = f" of {self.total:,}" if self.total is not None else ""
            self.console.print(f"{self.desc}: started ({self.done:,}{of} {self.unit})", markup=False)
        return self

    def start_at(self, done: int) -> None:
        """Work already done before this run (a resumed phase): counted, not in the rate."""
        self.done = self._offset = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.console.print(f"{self.desc}: {self._status()}", markup=False)

    def log(self, message: str) -> None:
        """A line printed above the bar (or plainly)."""
        (self._bar.console if self._bar is not None else self.console).print(message, markup=False, highlight=False)

    def _status(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        rate = (self.done - getattr(self, "_offset", 0)) / elapsed
        return f"{self.done:,}{of} {self.unit}, {rate:,.1f} {self.unit}/s, {elapsed:.0f} s"

    def __exit__(self, *exc) -> bool:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            self.console.print(f"{self.desc}: done, {self._status()}", markup=False)
        return False


def track(items: Iterable, total: int | None, desc: str, unit: str = "img", step=None, **kw) -> Iterator:
    """Iterate `items` with progress; each item advances by step(item) (default 1)."""
    with Progress(total, desc, unit, **kw) as p:
        for item in items:
            yield item
            p.advance(1 if step is None else step(item))
