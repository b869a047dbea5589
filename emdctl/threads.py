"""How many CPU threads torch uses, chosen so that a run does not collapse on shared cores.

torch's default is one intra-op thread per core, and its OpenMP threads spin while they wait for
work. For the small MLPs of 2-D problems every operation is tiny, so the threads spend their time
handing work over; on cores that other processes also use, the spinning threads steal each other's
time slices and a run slows down by a factor of several (docs: the `shared-cpu` rows of `emdctl bench`).

The policy (`threads: auto` in a recipe, `--threads auto` on the command line):

* vector data (analytic mixtures, MLP networks): 1 thread;
* images (convolutional networks, enough work per operation to share): torch's default count.

`emdctl` also sets OMP_WAIT_POLICY=PASSIVE before torch is imported (unless the environment sets it),
so idle OpenMP threads sleep instead of spinning. Neither changes a result: the CPU kernels emdctl
uses reduce in the same order at any thread count (tested: the default recipe's weights are the
same bit for bit at 1 and 2 threads). On a GPU the setting is ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import UserError


def parse_threads(value: str | int | None, field: str = "--threads") -> str | int | None:
    """'auto', a positive integer, or None (not given)."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise UserError(f"{field} {value!r}: give auto or a whole number of threads of at least 1")
    return n


def choose(setting: str | int, is_vector: bool, default: int) -> tuple[int, str]:
    """(threads, why) for a CPU run; `default` is torch's own count."""
    if setting != "auto":
        return int(setting), "as set"
    if is_vector:
        return 1, "auto: small MLP networks on vector data"
    return default, "auto: torch's default for image networks"


@contextlib.contextmanager
def cpu_threads(setting: str | int, is_vector: bool, device="cpu") -> Iterator[str | None]:
    """Run the body with the policy's thread count (restored afterwards); yields a description for
    the log, or None on a GPU."""
    import torch

    if torch.device(device).type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    n, why = choose(setting, is_vector, before)
    torch.set_num_threads(n)
    try:
        yield f"CPU threads: {n} ({why})"
    finally:
        torch.set_num_threads(before)
