"""Printing and recording evaluation results (tables, JSON, the run's metrics.jsonl)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from ..plots import save_scatter
from ..runs import RunDir
from ..storage import atomic_write_json
from .mixture import generator_mode_metrics


def _run_dir_of(source: Path) -> RunDir | None:
    source = Path(source)
    if (source / "checkpoints").is_dir():
        return RunDir(source)
    if source.name == "generator" and (source.parent / "checkpoints").is_dir():
        return RunDir(source.parent)
    return None


def _images_seen(run: RunDir) -> int | None:
    summary = run.root / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("images")
    records = run.read_metrics()
    return max((r.get("images", 0) for r in records), default=None)


def record_in_run(source: Path, record: dict) -> None:
    run = _run_dir_of(source)
    if run is not None:
        run.append_metrics({"kind": "evaluation", "images": _images_seen(run) or 0, "time": time.time(), **record})


def evaluate_and_report(
    metrics,
    source,
    ref,
    features,
    n,
    seed_ranges,
    batch,
    device,
    steps,
    inception_weights,
    ema,
    json_out: Path | None,
    console: Console,
    threads: str | int = "auto",
    ref_n: int | None = None,
) -> dict:
    # torch-fidelity (and the CLIP/torchvision modules it pulls in) takes seconds to import:
    # only the commands that use it pay for it.
    from .fidelity import evaluate_command

    res = evaluate_command(
        metrics,
        source,
        ref,
        features,
        n,
        seed_ranges,
        batch,
        device,
        steps,
        inception_weights,
        ema,
        log=lambda m: console.print(m),
        threads=threads,
        ref_n=ref_n,
    )
    source, ref = res["source"], res["reference"]
    names = {
        "fd": "FID" if res["comparable_to_published"] else "FD_classifier",
        "kid": "KID",
        "kid_std": "KID std",
        "precision": "precision",
        "recall": "recall",
        "is": "IS" if res["comparable_to_published"] else "IS_classifier",
    }
    against = f"{ref} ({res['reference_images']:,} images)" if ref else "-"
    table = Table(title=f"{source}  vs  {against}\n{res['feature_space']}")
    table.add_column("metric")
    for r in res["runs"]:
        table.add_column(f"seeds {r['seeds']}" if "seeds" in r else f"{r['images']} images", justify="right")
    if len(res["runs"]) > 1:
        table.add_column("min", justify="right")
        table.add_column("mean", justify="right")
    for key, summ in res["summary"].items():
        row = [names.get(key, key)] + [f"{r[key]:.5g}" for r in res["runs"]]
        if len(res["runs"]) > 1:
            row += [f"{summ['min']:.5g}", f"{summ['mean']:.5g}"]
        table.add_row(*row)
    console.print(table)
    record_in_run(
        source,
        {
            "feature_space": res["feature_space"],
            "features_ident": res["features_ident"],
            "ema": ema,
            **{f"eval/{names.get(k, k)}": v["min"] for k, v in res["summary"].items()},
        },
    )
    if json_out:
        atomic_write_json(json_out, res)
        console.print(f"wrote {json_out}")
    return res


def modes_and_report(
    sources: list[Path],
    seeds: list[int],
    plot: Path | None,
    json_out: Path | None,
    console: Console,
    use_ema: bool = True,
    within: float = 3.0,
    threads: str | int = "auto",
) -> dict:
    from ..sampling import open_generator
    from ..teachers.mixture import GaussianMixture
    from ..threads import cpu_threads

    results = {}
    for src in sources:
        gen, cfg = open_generator(src, use_ema)
        mix_params = (cfg.get("teacher") or {}).get("mixture")
        if not mix_params:
            raise UserError(f"{src}: not distilled from an analytic mixture teacher; mode metrics need one")
        mixture = GaussianMixture(**mix_params)
        with cpu_threads(threads, True):
            x, m = generator_mode_metrics(gen, mixture, seeds, within=within)
        results[str(src)] = m
        if plot is not None:
            plot_path = plot if len(sources) == 1 else plot.with_name(f"{plot.stem}-{len(results)}{plot.suffix}")
            title = (
                f"{Path(src).name}: TV {m['tv_distance']:.3f}, recall {m['mode_recall']:.2f}, "
                f"off-mode {m['off_mode_fraction']:.3f}"
            )
            save_scatter(
                x[:5000],
                plot_path,
                reference=mixture.sample(5000, torch.Generator().manual_seed(0)),
                means=mixture.means,
                radii=(mixture.scales * within).tolist(),
                title=title,
                legend=(
                    f"generator samples ({min(len(x), 5000):,} of {len(x):,})",
                    "exact mixture samples",
                    f"mode centres; circles: {within:g} scales, the region counted as the mode",
                ),
            )
            console.print(f"wrote {plot_path}")
        record_in_run(src, {"ema": use_ema, **{f"eval/{k}": v for k, v in m.items() if isinstance(v, int | float)}})
    table = Table(
        title=f"mode metrics (exact mixture reference; a mode's mass: samples within {within:g} of its scales)"
    )
    table.add_column("metric")
    for src in results:
        table.add_column(str(src), justify="right")
    first = next(iter(results.values()))
    keys = ("tv_distance", "mode_recall", "modes_covered", "off_mode_fraction", "mode_spread", "sliced_wasserstein")
    for key in keys:
        table.add_row(key, *[f"{r[key]:.4g}" for r in results.values()])
    table.add_row("true weights", *[" ".join(f"{w:.3f}" for w in first["true_weights"])] * len(results))
    table.add_row("expected mass", *[" ".join(f"{w:.3f}" for w in first["expected_mass"])] * len(results))
    table.add_row("mode mass", *[" ".join(f"{w:.3f}" for w in r["mode_mass"]) for r in results.values()])
    console.print(table)
    if json_out:
        atomic_write_json(json_out, results)
        console.print(f"wrote {json_out}")
    return results
