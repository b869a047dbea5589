"""`emdctl evaluate`: sample-quality metrics (FID, KID, IS, precision/recall through torch-fidelity),
mixture mode metrics and pixel statistics of a generator or an image set, printed as tables and
recorded in the run's metrics.jsonl. The metrics themselves are emdctl.evaluation's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..data import detect_format, open_dataset
from ..errors import UserError
from ..evaluation.fidelity import (
    METRICS,
    check_sides,
    compute_metrics,
    features_of_dataset,
    features_of_generator,
    get_reference,
    open_feature_space,
    reference_images,
    sample_size_problems,
    source_kind,
)
from ..evaluation.mixture import generator_mode_metrics
from ..plots import save_scatter
from ..runs import RunDir
from ..storage import atomic_write_json


def recipe_reference(source: Path) -> tuple[Path | None, str | None]:
    """(evaluation.reference, evaluation.features) of the recipe of the run `source` is or belongs to."""
    import yaml

    for run in (source, source.parent):
        recipe = run / "recipe.yaml"
        if (run / "checkpoints").is_dir() and recipe.is_file():
            try:
                section = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("evaluation") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                return None, None
            ref = section.get("reference")
            return (Path(ref) if ref else None), section.get("features")
    return None, None


def evaluate_command(
    *,
    metrics: list[str],
    source: Path | None,
    ref: Path | None,
    features: str | None,
    n: int,
    seed_ranges: list[list[int]] | None,
    batch: int,
    device: str = "auto",
    steps: int | None = None,
    inception_weights: Path | None = None,
    use_ema: bool = True,
    log=print,
    threads: str | int = "auto",
    ref_n: int | None = None,
) -> dict:
    """No source: the newest finished run under runs/. No ref (and no features): the run's recipe's
    evaluation.reference (and evaluation.features) when it names them. A reference dataset gives
    its first ref_n images (all by default; the log says how many)."""
    from ..distributed import resolve_device
    from ..threads import cpu_threads

    metrics = list(METRICS) if metrics == ["all"] else metrics
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r} (allowed: {', '.join(METRICS)}, all)")
    if source is None:
        from ..runs import newest_finished_run

        source = newest_finished_run()
        log(f"evaluating the newest finished run: {source}")
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such generator, run directory or dataset")
    needs_ref = any(m != "isc" for m in metrics)
    named_ref, named_features = recipe_reference(source)
    if features is None:
        features = named_features or "inception"
    if needs_ref and ref is None:
        if named_ref is None:
            raise UserError(
                "a reference is required for fid, kid and prc (a dataset or a statistics file from `evaluate ref`), "
                "unless the run's recipe names evaluation.reference"
            )
        ref = named_ref
        log(f"reference named by the run's recipe (evaluation.reference): {ref}")
    dev = resolve_device(device)
    fs = open_feature_space(features, inception_weights, dev)
    reference = get_reference(ref, fs, batch, ref_n, log) if needs_ref else None
    runs: list[dict] = []
    warnings: list[str] = []
    if source_kind(source) == "generator":
        from ..sampling import open_generator

        gen, _ = open_generator(source, use_ema)
        if len(gen.img_shape) != 3:
            raise UserError(f"{source}: a vector generator; use `emdctl evaluate modes` for mixture problems")
        check_sides(fs, tuple(gen.img_shape), str(source), reference, ref)
        ranges = seed_ranges or [list(range(n))]
        for seeds in ranges:
            warnings += sample_size_problems(metrics, len(seeds), reference_images(reference), fs)
            with cpu_threads(threads, False, dev):
                feats = features_of_generator(fs, gen, seeds, batch, dev, steps)
            runs.append({"seeds": f"{seeds[0]}-{seeds[-1]}", **compute_metrics(metrics, feats, reference, fs)})
    else:
        detect_format(source)
        ds = open_dataset(source, use_labels=False)
        check_sides(fs, tuple(ds.shape()), str(source), reference, ref)
        used = min(len(ds), n)
        warnings += sample_size_problems(metrics, used, reference_images(reference), fs)
        with cpu_threads(threads, False, dev):
            feats = features_of_dataset(fs, ds, batch, n, "samples")
        runs.append({"images": used, **compute_metrics(metrics, feats, reference, fs)})
    warnings = list(dict.fromkeys(warnings))
    for w in warnings:
        log(f"[yellow]warning: {w}[/]")
    keys = [k for k in runs[0] if k not in ("seeds", "images")]
    summary = {k: {"min": min(r[k] for r in runs), "mean": float(np.mean([r[k] for r in runs]))} for k in keys}
    return {
        "feature_space": fs.label,
        "comparable_to_published": fs.comparable,
        "features_ident": fs.ident,
        "source": str(source),
        "reference": str(ref) if ref else None,
        "reference_images": reference_images(reference),
        "runs": runs,
        "summary": summary,
        "warnings": warnings,
    }


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
    *,
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
    res = evaluate_command(
        metrics=metrics,
        source=source,
        ref=ref,
        features=features,
        n=n,
        seed_ranges=seed_ranges,
        batch=batch,
        device=device,
        steps=steps,
        inception_weights=inception_weights,
        use_ema=ema,
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
    *,
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


def stats_command(*, sources, n, device, json_out, use_ema, shift, console) -> dict:
    """`emdctl evaluate stats`: pixel statistics of each source, as a table (and JSON)."""
    from ..distributed import resolve_device
    from ..evaluation.stats import as_rows, images_of, statistics_table

    dev = resolve_device(device)
    stats = statistics_table({str(s): images_of(s, n, device=dev, use_ema=use_ema, shift=shift) for s in sources})
    table = Table(title="pixel statistics (grey levels 0-255; flat = per-image std < 10)")
    table.add_column("statistic")
    for s in stats:
        table.add_column(s, justify="right")
    for row in as_rows(stats):
        table.add_row(*row)
    console.print(table)
    if json_out:
        atomic_write_json(json_out, stats)
        console.print(f"wrote {json_out}")
    return stats


def clip_command(*, samples: Path, clip: str, n: int | None, device: str, json_out: Path | None) -> dict:
    """`emdctl evaluate clip`: the CLIP score of a prompted sample folder."""
    from ..distributed import resolve_device
    from ..evaluation.clip import clip_scores, open_clip_model, read_sample_folder

    dev = resolve_device(device)
    images, prompts = read_sample_folder(samples, n)
    model, tokenizer = open_clip_model(clip, dev)
    scores = clip_scores(model, tokenizer, images, prompts, dev)
    result = {"metric": "clip_score", "clip_score": float(scores.mean()),
              "clip_score_sd": float(scores.std()) if len(scores) > 1 else 0.0, "n": len(scores),
              "prompts": len(set(prompts)), "model": str(clip), "samples": str(samples)}  # fmt: skip
    if json_out is not None:
        atomic_write_json(json_out, result)
    return result
