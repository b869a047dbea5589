"""`emdctl demo mixture|loop|mnist`: distillation methods on the same budget, evaluated side by side
(`--methods`, by default EMD and Diff-Instruct; any of emdctl's methods, each paired with EMD).

mixture: an analytic mixture teacher; per-mode mass and its total-variation distance to the true
weights, mode recall, sliced Wasserstein; one scatter plot per method (PNG).
loop:    the quality loop on images: optionally train an EDM teacher, train the offline classifier
         feature space, sample the teacher, distill it with every method, and report feature-space
         distances to the teacher's samples and to the real data (plus Inception FID when weights
         are given), recall and the fraction of degenerate flat images, for the initial generator
         and every method (PNG grids side by side). `demo mnist` is this loop on the pretrained
         MNIST DDPM with its own 1000-step samples as the reference (not real MNIST alone: the
         teacher is imperfect, and a faithful student reproduces its flaws).
Everything is resumable: re-running the same command continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
from pathlib import Path

import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from ..recipe import DEFAULT_RECIPE_PATH, apply_overrides, parse_recipe, read_yaml
from ..storage import atomic_write_json
from .distill import run_recipe

# The comparison's reference: every other method is paired against it.
REFERENCE_METHOD = "emd"


def parse_methods(text: str) -> list[str]:
    """`--methods emd,diff-instruct,sid`: known names, no repeats, at least one."""
    from ..methods import DISTILLATION_METHODS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DISTILLATION_METHODS]
    if unknown or not names:
        raise UserError(f"--methods {text!r}: give a comma-separated list of {', '.join(DISTILLATION_METHODS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--methods {text!r}: a method is named twice")
    return names


REAL_DATA_METHODS = ("sida", "dmd2", "gdd")  # the methods that train against real images (method.data)


def _variants(base: dict, budget: int, steps: int, methods=("emd", "diff-instruct"), data: dict | None = None):
    """One recipe per method from the same base: the same teacher, generator, optimizer, batch,
    EMA and budget. EMD and Diff-Instruct share the base's method fields (noise levels, weighting:
    a matched pair). Every other method runs at its paper's own settings (recipe.schema's defaults:
    SiD's alpha and levels, DMD2's levels and GAN weights), its fake score at the method's own
    default levels, DMD2 with its five fake-score steps per generator step unless the base sets the
    count; `data` (a DataSpec dict) is the real data of the methods that need it (a mixture's is
    the mixture itself)."""
    base = copy.deepcopy(base)
    base["duration"] = budget
    base.setdefault("logging", {})["progress"] = False
    shared = {k: v for k, v in base["method"].items() if k not in ("name", "langevin")}
    out = {}
    for name in methods:
        r = copy.deepcopy(base)
        if name == "emd":
            r["method"] = {**copy.deepcopy(base["method"]), "name": "emd"}
            r["method"].setdefault("langevin", {})["steps"] = steps
        elif name == "diff-instruct":
            r["method"] = {"name": name, **copy.deepcopy(shared)}
        else:
            r["method"] = {"name": name}
            r.get("fake_score", {}).pop("noise_levels", None)
            if name == "dmd2":
                r.setdefault("fake_score", {}).setdefault("steps_per_iteration", 5)
            if data is not None and name in REAL_DATA_METHODS:
                r["method"]["data"] = copy.deepcopy(data)
        out[name] = r
    return out


# Fields `emdctl demo mixture` sets itself, and the option that sets each.
_DEMO_MIXTURE_OWNS = {
    "seed": "--seed or --seeds",
    "duration": "--budget",
    "teacher.preset": "--preset",
    "method.name": "--methods",
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
    methods: list[str] | tuple[str, ...] = ("emd", "diff-instruct"),
) -> dict:
    """Every method of `methods` on the same budget and seed (OUT/METHOD), then their mode metrics
    side by side. `base`: the recipe all runs start from (default: the embedded default recipe);
    `eval_every`: also record mode metrics during training (images; 0: off)."""
    from .evaluate import modes_and_report

    base = copy.deepcopy(base) if base is not None else read_yaml(DEFAULT_RECIPE_PATH)
    base["teacher"]["preset"] = preset
    base["seed"] = seed
    if eval_every:
        base.setdefault("logging", {})["eval_every"] = eval_every
    # Every method's recipe is checked before the first run starts.
    recipes = {name: parse_recipe({**data, "name": f"demo-mixture-{name}"}, f"demo ({name})")
               for name, data in _variants(base, budget, steps, methods).items()}  # fmt: skip
    runs = {}
    for name, recipe in recipes.items():
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(recipe, run_dir=out / name, console=console)
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
    summary = {name: {k: results[str(p)][k] for k in MODE_METRICS + ("mode_mass",)} for name, p in runs.items()}
    atomic_write_json(out / "summary.json", {"budget_images": budget, "preset": preset, "K": steps, **summary})
    console.print(f"scatter plots ({', '.join(runs)}): {out / 'modes-side-by-side.png'}", highlight=False)
    return summary


MODE_METRICS = ("tv_distance", "mode_recall", "modes_covered", "off_mode_fraction", "mode_spread", "sliced_wasserstein")


def _one_thread() -> None:
    # Worker processes of `--jobs`: side-by-side processes with torch's default thread count ran
    # several times slower on 2 cores than with one thread each (docs/performance.md). Results do
    # not depend on the thread count (tests/test_demo.py).
    import torch

    torch.set_num_threads(1)


def _demo_mixture_logged(out: Path, **kw) -> dict:
    """`demo_mixture` in a worker process, its console output in OUT/demo.log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.log", "w") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        console = Console(file=log, width=120)  # progress lines (on stderr) go to the same log
        return demo_mixture(out=out, console=console, **kw)


def _run_seeds(out: Path, seeds, console, jobs: int, **kw) -> dict:
    if jobs == 1:
        per_seed = {}
        for s in seeds:
            console.rule(f"seed {s}")
            per_seed[s] = demo_mixture(out=out / f"seed-{s}", seed=s, console=console, **kw)
        return per_seed
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    console.print(f"{len(seeds)} seeds, {jobs} at a time, one thread each; each seed's log: {out}/seed-S/demo.log")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = {pool.submit(_demo_mixture_logged, out / f"seed-{s}", seed=s, **kw): s for s in seeds}
        per_seed = {}
        for done in as_completed(futures):
            s = futures[done]
            per_seed[s] = done.result()
            console.print(f"seed {s} done ({len(per_seed)} of {len(seeds)})", highlight=False)
    return per_seed


def _label(name: str, steps: int) -> str:
    return f"EMD K={steps}" if name == "emd" else name


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
    methods: list[str] | tuple[str, ...] = ("emd", "diff-instruct"),
) -> dict:
    """`demo_mixture` once per seed (in OUT/seed-S), then every method's TV distance paired with
    the reference method's (EMD when it runs, else the first) over the seeds: a difference between
    methods on one seed can be seed noise; the paired statistics say how much of it is. Also each
    method's mean (sd) over seeds of every mode metric. With `eval_every`, the same comparison at
    every evaluation point of training as well (trace.json, tv-over-training.png). `jobs` > 1 runs
    that many seeds at once in worker processes of one thread each (the same results)."""
    from ..evaluation.paired import paired_comparison
    from ..plots import save_paired

    if len(seeds) < 2:
        raise UserError(f"a paired comparison needs at least two seeds (got {len(seeds)})")
    if len(methods) < 2:
        raise UserError(f"a comparison needs at least two methods (got {', '.join(methods)})")
    ref = REFERENCE_METHOD if REFERENCE_METHOD in methods else methods[0]
    others = [m for m in methods if m != ref]
    kw = dict(budget=budget, preset=preset, steps=steps, base=base, eval_every=eval_every, methods=tuple(methods))
    per_seed = _run_seeds(out, seeds, console, jobs, **kw)
    tv = {m: [per_seed[s][m]["tv_distance"] for s in seeds] for m in methods}
    table = Table(title=f"TV to the true weights over {len(seeds)} seeds ({preset}, {budget:,} images each)")
    table.add_column("seed", justify="right")
    for m in methods:
        table.add_column(_label(m, steps), justify="right")
    for i, s in enumerate(seeds):
        table.add_row(str(s), *[f"{tv[m][i]:.4f}" for m in methods])
    paired = {m: {"a": m, "b": ref, **paired_comparison(tv[m], tv[ref])} for m in others}
    table.add_row("mean (sd)", *[f"{statistics.mean(tv[m]):.4f} ({statistics.stdev(tv[m]):.4f})" for m in methods])
    console.print(table)
    for m, p in paired.items():
        console.print(
            f"{m} - {_label(ref, steps)}: {p['mean_difference']:+.4f}, standard error {p['standard_error']:.4f}, "
            f"t = {p['t']:.2f}; {ref} lower on {p['b_lower']} of {p['n']} seeds (sign test p = "
            f"{p['sign_test_p']:.3g}, one-sided); sign-flip p = {p['sign_flip_p']:.3g} (one-sided)",
            highlight=False,
        )
        save_paired(tv[m], tv[ref], [str(s) for s in seeds], out / f"paired-{m}.png", (f"{m} TV", f"{ref} TV"),
                    title=f"per seed: below the diagonal, {ref} has the lower TV")  # fmt: skip
    metrics = {m: {k: [float(per_seed[s][m][k]) for s in seeds] for k in MODE_METRICS} for m in methods}
    result = {
        "budget_images": budget,
        "preset": preset,
        "K": steps,
        "seeds": seeds,
        "methods": list(methods),
        "reference": ref,
        "tv_distance": tv,
        "metrics": metrics,
        "paired": paired,
    }
    if eval_every:
        result["trace"] = _paired_trace(out, seeds, steps, console, ref, others)
    atomic_write_json(out / "paired.json", result)
    console.print(f"paired plots: {', '.join(str(out / f'paired-{m}.png') for m in others)}", highlight=False)
    return result


def _training_evaluations(run: Path) -> dict[int, float]:
    """images seen -> TV, from the records the trainer wrote (`emdctl evaluate` records carry no
    iteration)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["images"]: r["eval/tv_distance"] for r in records if r.get("kind") == "evaluation" and "iteration" in r}


def _paired_trace(out: Path, seeds: list[int], steps: int, console: Console, ref: str, others: list[str]) -> dict:
    """The paired comparison of every method with the reference at every evaluation point all runs
    share."""
    from ..evaluation.paired import paired_comparison
    from ..plots import save_lines

    methods = [*others, ref]
    runs = {m: [_training_evaluations(out / f"seed-{s}" / m) for s in seeds] for m in methods}
    points = sorted(set.intersection(*(set(t) for traces in runs.values() for t in traces)))
    table = Table(
        title=f"TV to the true weights during training, mean over {len(seeds)} seeds "
        f"(difference: method - {ref}; p: one-sided sign-flip)"
    )
    table.add_column("images", justify="right", no_wrap=True)
    for m in methods:
        table.add_column(_label(m, steps), justify="right", no_wrap=True)
    for m in others:
        table.add_column(f"{m} - {ref} (SE), p", justify="right", no_wrap=True)
    trace: dict[str, list] = {m: [] for m in others}
    for x in points:
        row = [f"{x:,}"]
        stats = {m: paired_comparison([t[x] for t in runs[m]], [t[x] for t in runs[ref]]) for m in others}
        for m in others:
            trace[m].append({"images": x, **stats[m]})
        row += [f"{stats[m]['mean_a']:.4f}" for m in others] + [f"{next(iter(stats.values()))['mean_b']:.4f}"]
        row += [f"{stats[m]['mean_difference']:+.4f} ({stats[m]['standard_error']:.4f}), {stats[m]['sign_flip_p']:.3g}"
                for m in others]  # fmt: skip
        table.add_row(*row)
    console.print(table)
    n = len(seeds) ** 0.5
    first = trace[others[0]]
    keep = slice(1, None) if len(first) > 2 else slice(None)  # the initial generator's TV would flatten the rest
    series = {_label(m, steps): ([p["mean_a"] for p in trace[m][keep]], [p["sd_a"] / n for p in trace[m][keep]])
              for m in others}  # fmt: skip
    series[_label(ref, steps)] = ([p["mean_b"] for p in first[keep]], [p["sd_b"] / n for p in first[keep]])
    save_lines([p["images"] for p in first[keep]], series, out / "tv-over-training.png",
               title=f"TV to the true weights, mean +- SE over {len(seeds)} seeds")  # fmt: skip
    console.print(f"TV over training: {out / 'tv-over-training.png'}")
    # One run's TV swings by about +-0.01 between evaluations (generator and fake score chase each
    # other); its mean over the second half of training is a steadier per-seed figure.
    late = [x for x in points if x >= points[-1] / 2]
    per_seed = {m: [sum(t[x] for x in late) / len(late) for t in traces] for m, traces in runs.items()}
    second_half = {}
    for m in others:
        p = paired_comparison(per_seed[m], per_seed[ref])
        second_half[m] = {"a": m, "b": ref, **p}
        console.print(
            f"mean TV over the {len(late)} evaluations from {late[0]:,} images on: {m} {p['mean_a']:.4f} "
            f"(sd {p['sd_a']:.4f}), {ref} {p['mean_b']:.4f} (sd {p['sd_b']:.4f}); difference "
            f"{p['mean_difference']:+.4f}, SE {p['standard_error']:.4f}, t = {p['t']:.2f}; {ref} lower on "
            f"{p['b_lower']} of {p['n']} seeds (sign test p = {p['sign_test_p']:.3g}); sign-flip p = "
            f"{p['sign_flip_p']:.3g} (one-sided)",
            highlight=False,
        )
    return {
        "reference": ref,
        "points": trace,
        "second_half": {"from_images": late[0], "evaluations": len(late), "per_seed": per_seed, "paired": second_half},
    }


def loop_inputs(out: Path, data: Path, distill_recipe: Path) -> dict:
    """The quality loops' inputs, checked before anything runs: the output folder (made), the real
    data (it must exist) and the distillation recipe as plain data."""
    out.mkdir(parents=True, exist_ok=True)
    if not Path(data).exists():
        raise UserError(f"{data}: no such dataset (the real, labelled images for the feature space)")
    base = read_yaml(distill_recipe)
    if not isinstance(base, dict):
        raise UserError(f"{distill_recipe}: not a distillation recipe")
    return base


def train_teacher_first(teacher_train: Path, out: Path, console: Console, kind: str | None = None) -> Path:
    """Train the teacher of `teacher_train` into OUT/teacher-train (resumes); its exported teacher.
    `kind`: the recipe kind the loop needs (None: any teacher recipe)."""
    t = parse_recipe(read_yaml(teacher_train), str(teacher_train))
    if kind is not None and t.kind != kind:
        raise UserError(f"{teacher_train}: this loop's teacher comes from a {kind} recipe (not {t.kind})")
    console.print(f"[bold]teacher[/]: training {t.duration:,} images ({teacher_train})", highlight=False)
    run_recipe(t, run_dir=out / "teacher-train", console=console)
    return out / "teacher-train" / "teacher"


def save_initial_generator(teacher, r, init_dir: Path, data: dict, extra: dict | None = None) -> Path:
    """The generator before training (the teacher's network at sigma*), saved once: a row of the loops' tables."""
    from ..generator import build_generator
    from ..storage import load_state_strict

    if not (init_dir / "config.json").exists():
        gen = build_generator(teacher.student_config, r.generator.sigma_star, r.generator.arch_overrides)
        load_state_strict(gen.denoiser, teacher.init_weights(), "teacher")
        gen.save_pretrained(init_dir, data, extra)
    return init_dir


LOOP_LABELS = {"emd": "EMD", "diff-instruct": "Diff-Instruct", "sid": "SiD", "sida": "SiDA", "dmd2": "DMD2",
               "gdd": "GDD", "moment-matching": "Moment Matching"}  # fmt: skip


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
    methods: list[str] | tuple[str, ...] = ("emd", "diff-instruct"),
) -> dict:
    """The quality loop: [train the teacher], train the feature space, sample the teacher, distill it
    with every method of `methods` on the same budget (the methods that need real data get `data`),
    and evaluate every model against the teacher's samples and the real data. shift_background:
    also evaluate every image set after `shift_background` (for a teacher whose score cannot see an
    image's mean level), as rows marked "shifted"."""
    from ..distributed import resolve_device
    from ..evaluation.classifier import train_feature_net
    from ..evaluation.fidelity import compute_metrics, open_feature_space, reference_from_features
    from ..evaluation.stats import images_of, pixel_statistics
    from ..plots import save_image_grid
    from ..teachers import load_teacher
    from .sample import sample_command

    console = console or Console(stderr=True)
    dev = resolve_device(device)
    base = loop_inputs(out, data, distill_recipe)
    if teacher_train is not None:
        base["teacher"] = {"kind": "pretrained", "path": str(train_teacher_first(teacher_train, out, console))}
    recipe_file = out / "distill-recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(base, sort_keys=False))
    # A bad recipe or a missing teacher fails here, not after minutes of feature training.
    r = parse_recipe(base, str(distill_recipe))
    teacher = load_teacher(r.teacher, seed=r.seed)
    real = {"path": str(Path(data).resolve()), "labels": bool(teacher.label_dim)}
    variants = _variants(
        base, budget or r.duration, r.method.langevin.steps if r.method.name == "emd" else 8, methods, real
    )
    checked = {name: parse_recipe({**v, "name": f"demo-{name}"}, f"demo ({name})") for name, v in variants.items()}
    init_dir = save_initial_generator(teacher, r, out / "initial-generator", {"kind": "image", "range": [-1.0, 1.0]})
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
    for name, recipe in checked.items():
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(recipe, run_dir=out / name, console=console)

    sources = {
        f"teacher ({teacher_steps} steps)": out / "teacher-samples" / "samples.npz",
        "initial generator (1 step)": init_dir,
        **{f"{LOOP_LABELS.get(name, name)} (1 step)": out / name for name in checked},
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
    console.print(f"image grids ({', '.join(sources)}): {out / 'grids-side-by-side.png'}", highlight=False)
    return results
