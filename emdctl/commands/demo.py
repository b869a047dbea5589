"""`emdctl demo mixture|mnist`: EMD and Diff-Instruct on the same budget, evaluated side by side.

mixture: an analytic mixture teacher; per-mode mass and its total-variation distance to the true
weights, mode recall, sliced Wasserstein; one scatter plot per method (PNG).
loop:    the quality loop on images: optionally train an EDM teacher, train the offline classifier
         feature space, sample the teacher, distill it with both methods, and report feature-space
         distances to the teacher's samples and to the real data (plus Inception FID when weights
         are given), recall and the fraction of degenerate flat images, for the initial generator,
         EMD and Diff-Instruct (PNG grids side by side). `demo mnist` is this loop on the pretrained
         MNIST DDPM with its own 1000-step samples as the reference (not real MNIST alone: the
         teacher is imperfect, and a faithful student reproduces its flaws).
Everything is resumable: re-running the same command continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from ..recipe import DEFAULT_RECIPE_PATH, apply_overrides, parse_recipe, read_yaml
from ..storage import atomic_write_json
from .distill import run_recipe


def _variants(base: dict, budget: int, steps: int) -> dict[str, dict]:
    base = copy.deepcopy(base)
    base["duration"] = budget
    base.setdefault("logging", {})["progress"] = False
    emd = copy.deepcopy(base)
    emd["method"] = {**emd["method"], "name": "emd"}
    emd["method"].setdefault("langevin", {})["steps"] = steps
    di = copy.deepcopy(base)
    di["method"] = {k: v for k, v in base["method"].items() if k != "langevin"}
    di["method"]["name"] = "diff-instruct"
    return {"emd": emd, "diff-instruct": di}


# Fields `emdctl demo mixture` sets itself, and the option that sets each.
_DEMO_MIXTURE_OWNS = {
    "seed": "--seed or --seeds",
    "duration": "--budget",
    "teacher.preset": "--preset",
    "method.name": "nothing: both methods run",
    "method.langevin.steps": "--k",
    "logging.eval_every": "--eval-every",
}


def mixture_base(overrides: list[str], budget: int) -> dict:
    """The embedded default recipe with `--set` overrides, validated at the demo's budget (fields
    such as optim.decay.start are checked against it) before any run starts; both methods' runs
    start from it."""
    base = read_yaml(DEFAULT_RECIPE_PATH)
    base["duration"] = budget
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _DEMO_MIXTURE_OWNS:
            raise UserError(f"--set {item!r}: demo mixture sets {key} itself; use {_DEMO_MIXTURE_OWNS[key]}")
    base = apply_overrides(base, overrides, "default recipe")
    parse_recipe(base, f"default recipe (with --set {', '.join(overrides)})")
    return base


def _side_by_side(paths: list[Path], out: Path) -> None:
    images = [Image.open(p).convert("RGB") for p in paths]
    w = sum(i.width for i in images)
    h = max(i.height for i in images)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width
    canvas.save(out)


def demo_mixture(
    *,
    out: Path,
    budget: int,
    preset: str,
    steps: int,
    seed: int,
    console: Console,
    base: dict | None = None,
    eval_every: int = 0,
) -> dict:
    """`base`: the recipe both runs start from (default: the embedded default recipe);
    `eval_every`: also record mode metrics during training (images; 0: off)."""
    from .evaluate import modes_and_report

    base = copy.deepcopy(base) if base is not None else read_yaml(DEFAULT_RECIPE_PATH)
    base["teacher"]["preset"] = preset
    base["seed"] = seed
    if eval_every:
        base.setdefault("logging", {})["eval_every"] = eval_every
    runs = {}
    for name, data in _variants(base, budget, steps).items():
        data["name"] = f"demo-mixture-{name}"
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(parse_recipe(data, f"demo ({name})"), run_dir=out / name, console=console)
        runs[name] = out / name
    results = modes_and_report(
        sources=list(runs.values()),
        seeds=list(range(20000)),
        plot=out / "modes.png",
        json_out=out / "modes.json",
        console=console,
    )
    plots = [out / f"modes-{i + 1}.png" for i in range(len(runs))]
    _side_by_side(plots, out / "modes-side-by-side.png")
    summary = {
        name: {
            k: results[str(p)][k]
            for k in (
                "tv_distance",
                "mode_recall",
                "modes_covered",
                "off_mode_fraction",
                "mode_spread",
                "sliced_wasserstein",
                "mode_mass",
            )
        }
        for name, p in runs.items()
    }
    atomic_write_json(out / "summary.json", {"budget_images": budget, "preset": preset, "K": steps, **summary})
    console.print(f"scatter plots: {out / 'modes-side-by-side.png'}")
    return summary


def _one_thread() -> None:
    # Worker processes of `--jobs`: side-by-side processes with torch's default thread count ran
    # several times slower on 2 cores than with one thread each (docs/performance.md). Results do
    # not depend on the thread count (tests/test_demo.py).
    import torch

    torch.set_num_threads(1)


def _demo_mixture_logged(
    out: Path, budget: int, preset: str, steps: int, seed: int, base: dict | None, eval_every: int
) -> dict:
    """`demo_mixture` in a worker process, its console output in OUT/demo.log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.log", "w") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        console = Console(file=log, width=120)  # progress lines (on stderr) go to the same log
        return demo_mixture(
            out=out,
            budget=budget,
            preset=preset,
            steps=steps,
            seed=seed,
            console=console,
            base=base,
            eval_every=eval_every,
        )


def _run_seeds(out: Path, budget, preset, steps, seeds, console, base, eval_every, jobs: int) -> dict:
    if jobs == 1:
        per_seed = {}
        for s in seeds:
            console.rule(f"seed {s}")
            per_seed[s] = demo_mixture(
                out=out / f"seed-{s}",
                budget=budget,
                preset=preset,
                steps=steps,
                seed=s,
                console=console,
                base=base,
                eval_every=eval_every,
            )
        return per_seed
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    console.print(f"{len(seeds)} seeds, {jobs} at a time, one thread each; each seed's log: {out}/seed-S/demo.log")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = {
            pool.submit(_demo_mixture_logged, out / f"seed-{s}", budget, preset, steps, s, base, eval_every): s
            for s in seeds
        }
        per_seed = {}
        for done in as_completed(futures):
            s = futures[done]
            per_seed[s] = done.result()
            console.print(f"seed {s} done ({len(per_seed)} of {len(seeds)})", highlight=False)
    return per_seed


def demo_mixture_seeds(
    *,
    out: Path,
    budget: int,
    preset: str,
    steps: int,
    seeds: list[int],
    console: Console,
    base: dict | None = None,
    eval_every: int = 0,
    jobs: int = 1,
) -> dict:
    """`demo_mixture` once per seed (in OUT/seed-S), then the paired comparison of the two methods'
    TV distances over the seeds: a difference between methods on one seed can be seed noise; the
    paired statistics say how much of it is. With `eval_every`, the same comparison at every
    evaluation point of training as well (trace.json, tv-over-training.png). `jobs` > 1 runs that
    many seeds at once in worker processes of one thread each (the same results)."""
    from ..evaluation.paired import paired_comparison
    from ..plots import save_paired

    if len(seeds) < 2:
        raise UserError(f"a paired comparison needs at least two seeds (got {len(seeds)})")
    per_seed = _run_seeds(out, budget, preset, steps, seeds, console, base, eval_every, jobs)
    di = [per_seed[s]["diff-instruct"]["tv_distance"] for s in seeds]
    emd = [per_seed[s]["emd"]["tv_distance"] for s in seeds]
    paired = paired_comparison(di, emd)
    table = Table(title=f"TV to the true weights over {len(seeds)} seeds ({preset}, {budget:,} images each)")
    for col in ("seed", "Diff-Instruct", f"EMD K={steps}", "EMD lower"):
        table.add_column(col, justify="right")
    for s, a, b in zip(seeds, di, emd, strict=True):
        table.add_row(str(s), f"{a:.4f}", f"{b:.4f}", "yes" if b < a else "no")
    mean_sd = [f"{paired[f'mean_{m}']:.4f} ({paired[f'sd_{m}']:.4f})" for m in ("a", "b")]
    table.add_row("mean (sd)", *mean_sd, "")
    console.print(table)
    console.print(
        f"paired difference (Diff-Instruct - EMD): {paired['mean_difference']:.4f}, standard error "
        f"{paired['standard_error']:.4f}, t = {paired['t']:.2f}; EMD lower on {paired['b_lower']} of "
        f"{paired['n']} seeds (sign test p = {paired['sign_test_p']:.3g}, one-sided); sign-flip p = "
        f"{paired['sign_flip_p']:.3g} (one-sided)",
        highlight=False,
    )
    save_paired(di, emd, [str(s) for s in seeds], out / "paired.png", ("Diff-Instruct TV", "EMD TV"),
                title="per seed: below the diagonal, EMD has the lower TV")  # fmt: skip
    result = {
        "budget_images": budget,
        "preset": preset,
        "K": steps,
        "seeds": seeds,
        "tv_distance": {"diff-instruct": di, "emd": emd},
        "paired": {"a": "diff-instruct", "b": "emd", **paired},
    }
    if eval_every:
        result["trace"] = _paired_trace(out, seeds, steps, console)
    atomic_write_json(out / "paired.json", result)
    console.print(f"paired plot: {out / 'paired.png'}")
    return result


def _training_evaluations(run: Path) -> dict[int, float]:
    """images seen -> TV, from the records the trainer wrote (`emdctl evaluate` records carry no
    iteration)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["images"]: r["eval/tv_distance"] for r in records if r.get("kind") == "evaluation" and "iteration" in r}


def _paired_trace(out: Path, seeds: list[int], steps: int, console: Console) -> dict:
    """The paired comparison at every evaluation point all runs share."""
    from ..evaluation.paired import paired_comparison
    from ..plots import save_lines

    runs = {m: [_training_evaluations(out / f"seed-{s}" / m) for s in seeds] for m in ("diff-instruct", "emd")}
    points = sorted(set.intersection(*(set(t) for traces in runs.values() for t in traces)))
    table = Table(
        title=f"TV to the true weights during training, mean over {len(seeds)} seeds "
        "(DI: Diff-Instruct; p: one-sided sign-flip)"
    )
    for col in ("images", "DI", f"EMD K={steps}", "DI - EMD (SE)", "EMD lower", "p"):
        table.add_column(col, justify="right", no_wrap=True)
    trace = []
    for x in points:
        p = paired_comparison([t[x] for t in runs["diff-instruct"]], [t[x] for t in runs["emd"]])
        trace.append({"images": x, **p})
        table.add_row(f"{x:,}", f"{p['mean_a']:.4f}", f"{p['mean_b']:.4f}",
                      f"{p['mean_difference']:.4f} ({p['standard_error']:.4f})", f"{p['b_lower']}/{p['n']}",
                      f"{p['sign_flip_p']:.3g}")  # fmt: skip
    console.print(table)
    n = len(seeds) ** 0.5
    shown = trace[1:] if len(trace) > 2 else trace  # the initial generator's TV would flatten the rest
    series = {
        name: ([p[f"mean_{k}"] for p in shown], [p[f"sd_{k}"] / n for p in shown])
        for name, k in (("Diff-Instruct", "a"), (f"EMD K={steps}", "b"))
    }
    save_lines([p["images"] for p in shown], series, out / "tv-over-training.png",
               title=f"TV to the true weights, mean +- SE over {len(seeds)} seeds")  # fmt: skip
    console.print(f"TV over training: {out / 'tv-over-training.png'}")
    # One run's TV swings by about +-0.01 between evaluations (generator and fake score chase each
    # other); its mean over the second half of training is a steadier per-seed figure.
    late = [x for x in points if x >= points[-1] / 2]
    per_seed = {m: [sum(t[x] for x in late) / len(late) for t in traces] for m, traces in runs.items()}
    p = paired_comparison(per_seed["diff-instruct"], per_seed["emd"])
    console.print(
        f"mean TV over the {len(late)} evaluations from {late[0]:,} images on: Diff-Instruct {p['mean_a']:.4f} "
        f"(sd {p['sd_a']:.4f}), EMD {p['mean_b']:.4f} (sd {p['sd_b']:.4f}); difference {p['mean_difference']:.4f}, "
        f"SE {p['standard_error']:.4f}, t = {p['t']:.2f}; EMD lower on {p['b_lower']} of {p['n']} seeds "
        f"(sign test p = {p['sign_test_p']:.3g}); sign-flip p = {p['sign_flip_p']:.3g} (one-sided)",
        highlight=False,
    )
    return {
        "a": "diff-instruct",
        "b": "emd",
        "points": trace,
        "second_half": {"from_images": late[0], "evaluations": len(late), "per_seed": per_seed, **p},
    }


def demo_loop(
    *,
    out: Path,
    distill_recipe: Path,
    data: Path,
    budget: int | None,
    n: int,
    teacher_steps: int,
    teacher_train: Path | None = None,
    features: Path | None = None,
    inception_weights: Path | None = None,
    device: str = "auto",
    console: Console | None = None,
    shift_background: bool = False,
) -> dict:
    """The quality loop: [train the teacher], train the feature space, sample the teacher, distill it
    with EMD and Diff-Instruct on the same budget, and evaluate every model against the teacher's
    samples and the real data. shift_background: also evaluate every image set after
    `shift_background` (for a teacher whose score cannot see an image's mean level), as rows marked
    "shifted"."""
    from ..distributed import resolve_device
    from ..evaluation.classifier import train_feature_net
    from ..evaluation.fidelity import compute_metrics, open_feature_space, reference_from_features
    from ..evaluation.stats import images_of, pixel_statistics
    from ..generator import build_generator
    from ..plots import save_image_grid
    from ..storage import load_state_strict
    from ..teachers import load_teacher
    from .sample import sample_command

    console = console or Console(stderr=True)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(data).exists():
        raise UserError(f"{data}: no such dataset (the real, labelled images for the feature space)")
    base = read_yaml(distill_recipe)
    if not isinstance(base, dict):
        raise UserError(f"{distill_recipe}: not a distillation recipe")
    if teacher_train is not None:
        t = parse_recipe(read_yaml(teacher_train), str(teacher_train))
        console.print(f"[bold]teacher[/]: training {t.duration:,} images ({teacher_train})", highlight=False)
        run_recipe(t, run_dir=out / "teacher-train", console=console)
        base["teacher"] = {"kind": "pretrained", "path": str(out / "teacher-train" / "teacher")}
    recipe_file = out / "distill-recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(base, sort_keys=False))
    # A bad recipe or a missing teacher fails here, not after minutes of feature training.
    r = parse_recipe(base, str(distill_recipe))
    teacher = load_teacher(r.teacher, seed=r.seed)
    init_dir = out / "initial-generator"
    if not (init_dir / "config.json").exists():
        gen = build_generator(teacher.student_config, r.generator.sigma_star, r.generator.arch_overrides)
        load_state_strict(gen.denoiser, teacher.init_weights(), "teacher")
        gen.save_pretrained(init_dir, {"kind": "image", "range": [-1.0, 1.0]})
        del gen
    del teacher  # the sampler and the trainer load their own

    features = features or out / "features.safetensors"
    if not Path(features).exists():
        console.print(f"training the classifier feature space on {data}")
        train_feature_net(data, features, epochs=3, device=str(dev), log=lambda m: console.print(m))
    spaces = {"classifier": open_feature_space(f"classifier:{features}", device=dev)}
    if inception_weights is not None:
        spaces["inception"] = open_feature_space("inception", inception_weights, dev)

    console.print(f"teacher samples: {n} at {teacher_steps} steps")
    sample_command(
        source=None,
        teacher_recipe=recipe_file,
        seeds=list(range(n)),
        out_dir=out / "teacher-samples",
        batch=256,
        steps=teacher_steps,
        fmt="npz",
        class_label=None,
        use_ema=True,
        sampler="auto",
        device_name=device,
        show_progress=True,
        keep_float=shift_background,
    )

    budget = budget or r.duration
    for name, variant in _variants(base, budget, base.get("method", {}).get("langevin", {}).get("steps", 8)).items():
        variant["name"] = f"demo-{name}"
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(parse_recipe(variant, f"demo ({name})"), run_dir=out / name, console=console)

    sources = {
        f"teacher ({teacher_steps} steps)": out / "teacher-samples" / "samples.npz",
        "initial generator (1 step)": init_dir,
        "EMD (1 step)": out / "emd",
        "Diff-Instruct (1 step)": out / "diff-instruct",
        "real data": Path(data),
    }
    eval_seeds = list(range(10_000_000, 10_000_000 + n))  # not the seeds the teacher samples used
    teacher_name, real_name = next(iter(sources)), "real data"
    images = {name: images_of(src, n, device=dev, seeds=eval_seeds) for name, src in sources.items()}
    shifted = (
        {name: images_of(src, n, device=dev, seeds=eval_seeds, shift=True) for name, src in sources.items()}
        if shift_background
        else {}
    )
    results: dict[str, dict] = {name: {} for name in sources}
    for prefix, imgs in (("", images), ("shifted: ", shifted)):
        if not imgs:
            continue
        for name, x in imgs.items():
            results[name].update({prefix + k: v for k, v in pixel_statistics(x).items()})
        for space, fs in spaces.items():
            feats = {name: fs.extract_batched(x) for name, x in imgs.items()}
            ref_t = reference_from_features(feats[teacher_name], fs, {})
            ref_r = reference_from_features(feats[real_name], fs, {})
            label = prefix + ("FID" if fs.comparable else "FD_classifier")
            for name in sources:
                res = results[name]
                res[f"{label} to teacher"] = compute_metrics(["fid"], feats[name], ref_t, fs)["fd"]
                res[f"{label} to real"] = compute_metrics(["fid"], feats[name], ref_r, fs)["fd"]
                res[f"{prefix}recall to real ({space})"] = compute_metrics(["prc"], feats[name], ref_r, fs)["recall"]
    table = Table(
        title=f"{distill_recipe}: {budget:,} training images per method, {n} samples per model\n"
        + "; ".join(fs.label for fs in spaces.values())
    )
    table.add_column("quantity")
    for name in sources:
        table.add_column(name, justify="right")
    pixels = ["flat_fraction", "flat_black_fraction", "flat_white_fraction", "mean_brightness", "mean_contrast"]
    keys = []
    for prefix in ("", "shifted: ") if shift_background else ("",):
        measured = [k for k in results[teacher_name] if " to " in k and k.startswith("shifted: ") == bool(prefix)]
        keys += measured + [prefix + k for k in pixels]
    for key in keys:
        table.add_row(key, *[f"{results[s][key]:.4g}" for s in sources])
    console.print(table)
    for suffix, imgs in (("", images), ("-shifted", shifted)):
        grids = []
        for i, x in enumerate(imgs.values()):
            p = out / f"grid-{i}{suffix}.png"
            save_image_grid(x[:64], p)
            grids.append(p)
        if grids:
            _side_by_side(grids, out / f"grids-side-by-side{suffix}.png")
    atomic_write_json(
        out / "summary.json",
        {
            "budget_images": budget,
            "samples": n,
            "teacher_steps": teacher_steps,
            "shift_background": shift_background,
            "feature_spaces": [fs.label for fs in spaces.values()],
            "sources": {k: str(v) for k, v in sources.items()},
            "results": results,
        },
    )
    console.print(f"image grids (teacher, initial, EMD, Diff-Instruct, real): {out / 'grids-side-by-side.png'}")
    return results
