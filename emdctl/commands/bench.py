"""`emdctl bench`: the measurements of emdctl.bench, printed as a table of ratios (and JSON)."""

from __future__ import annotations

from rich.table import Table

from ..bench import run_bench
from ..storage import atomic_write_json


def bench_command(*, json_out=None, console, log=print, **options) -> dict:
    """run_bench(**options), then the table: each row's baseline and configured numbers, the ratio
    configured / baseline, and peak GPU memory."""
    res = run_bench(
        options.pop("net"), options.pop("batch"), options.pop("k"), options.pop("device"), options.pop("dtype"),
        options.pop("compile"), options.pop("channels_last"), options.pop("fused"), options.pop("iters"),
        options.pop("warmup"), options.pop("sections"), options.pop("compare_unfused"), log=log, **options,
    )  # fmt: skip
    info = res["info"]
    table = Table(
        title=f"{info['net']} ({info['parameters'] / 1e6:.1f}M params), batch {info['batch']}, "
        f"{info['device_name']}, torch {info['torch']}"
    )
    for col in ("measurement", f"baseline: {info['baseline']}", f"configured: {info['configured']}", "ratio",
                "peak GB (base / conf)"):  # fmt: skip
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for name, row in res["results"].items():
        peak = "-"
        if row["baseline_peak_gb"] is not None:
            peak = f"{row['baseline_peak_gb']:.2f} / {row['configured_peak_gb']:.2f}"
        table.add_row(
            name, f"{row['baseline']:.2f} {row['unit']}", f"{row['configured']:.2f} {row['unit']}",
            f"{row['ratio']:.2f}x", peak,
        )  # fmt: skip
    console.print(table)
    if json_out:
        atomic_write_json(json_out, res)
    return res
