"""`emdctl demo mixture|mnist`: EMD and Diff-Instruct on the same budget, evaluated side by side.

mixture: an analytic mixture teacher; per-mode mass and its total-variation distance to the true
weights, mode recall, sliced Wasserstein; one scatter plot per method (PNG).
mnist:   the pretrained MNIST DDPM; FD in the offline classifier feature space to the teacher's own
1000-step samples (not to real MNIST: the teacher is imperfect) and to real MNIST, and the
fraction of degenerate flat images, for the initial generator, EMD and Diff-Instruct (PNG grids).
Everything is resumable: re-running the same command continues where it stopped.
"""

from __future__ import annotations

import copy
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .recipe import DEFAULT_RECIPE_PATH, parse_recipe, read_yaml
from .storage import atomic_write_json
from .trainer import run_recipe


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


def demo_mixture(out: Path, budget: int, preset: str, steps: int, seed: int, console: Console) -> dict:
    from .evaluation.report import modes_and_report

    base = read_yaml(DEFAULT_RECIPE_PATH)
    base["teacher"]["preset"] = preset
    base["seed"] = seed
    runs = {}
    for name, data in _variants(base, budget, steps).items():
        data["name"] = f"demo-mixture-{name}"
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(parse_recipe(data, f"demo ({name})"), run_dir=out / name, console=console)
        runs[name] = out / name
    results = modes_and_report(list(runs.values()), list(range(20000)), out / "modes.png", out / "modes.json", console)
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
                "sliced_wasserstein",
                "mode_mass",
            )
        }
        for name, p in runs.items()
    }
    atomic_write_json(out / "summary.json", {"budget_images": budget, "preset": preset, "K": steps, **summary})
    console.print(f"scatter plots: {out / 'modes-side-by-side.png'}")
    return summary


def demo_mnist(
    out: Path,
    teacher_recipe: Path,
    budget: int,
    n: int,
    mnist: Path,
    features: Path | None,
    device: str,
    console: Console,
) -> dict:
    from .distributed import resolve_device
    from .evaluation.classifier import train_feature_net
    from .evaluation.fidelity import compute_metrics, open_feature_space, reference_from_features
    from .evaluation.stats import images_of, pixel_statistics
    from .generator import build_generator
    from .plots import save_image_grid
    from .sampling import sample_command
    from .storage import load_state_strict
    from .teachers import load_teacher

    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(mnist).exists():
        raise UserError(f"{mnist}: no such MNIST directory (--mnist, the official idx files)")
    features = features or out / "mnist-features.safetensors"
    if not Path(features).exists():
        console.print("training the classifier feature space on MNIST")
        train_feature_net(mnist, features, epochs=3, device=str(dev), log=lambda m: console.print(m))
    fs = open_feature_space(f"classifier:{features}", device=dev)

    console.print(f"teacher samples: {n} with its own 1000-step ancestral sampler")
    sample_command(
        None,
        teacher_recipe,
        list(range(n)),
        out / "teacher-1000",
        256,
        1000,
        "npz",
        None,
        True,
        "ddpm",
        device,
        show_progress=True,
    )

    base = read_yaml(teacher_recipe)
    recipes = _variants(base, budget, base.get("method", {}).get("langevin", {}).get("steps", 8))
    for name, data in recipes.items():
        data["name"] = f"demo-mnist-{name}"
        console.print(f"[bold]{name}[/]: {budget:,} images", highlight=False)
        run_recipe(parse_recipe(data, f"demo ({name})"), run_dir=out / name, console=console)

    r = parse_recipe(base, str(teacher_recipe))
    init_dir = out / "init-generator"
    if not (init_dir / "config.json").exists():
        teacher = load_teacher(r.teacher, seed=r.seed)
        gen = build_generator(teacher.student_config, r.generator.sigma_star, r.generator.arch_overrides)
        load_state_strict(gen.denoiser, teacher.init_weights(), "teacher")
        gen.save_pretrained(init_dir, {"kind": "image", "range": [-1.0, 1.0]})

    sources = {
        "teacher (1000 steps)": out / "teacher-1000" / "samples.npz",
        "initial generator": init_dir,
        "EMD": out / "emd",
        "Diff-Instruct": out / "diff-instruct",
        "real MNIST": Path(mnist),
    }
    images = {
        name: images_of(src, n, device=dev, seeds=list(range(10_000_000, 10_000_000 + n)))
        for name, src in sources.items()
    }
    feats = {name: fs.extract_batched(x) for name, x in images.items()}
    ref_teacher = reference_from_features(feats["teacher (1000 steps)"], fs, {})
    ref_real = reference_from_features(feats["real MNIST"], fs, {})
    results = {}
    for name in sources:
        results[name] = {
            "fd_to_teacher": compute_metrics(["fid"], feats[name], ref_teacher, fs)["fd"],
            "fd_to_real_mnist": compute_metrics(["fid"], feats[name], ref_real, fs)["fd"],
            **pixel_statistics(images[name]),
        }
    table = Table(title=f"MNIST DDPM distilled for {budget:,} images; {n} samples each\n{fs.label}")
    table.add_column("quantity")
    for name in sources:
        table.add_column(name, justify="right")
    for key in (
        "fd_to_teacher",
        "fd_to_real_mnist",
        "flat_fraction",
        "flat_white_fraction",
        "flat_grey_fraction",
        "mean_brightness",
        "mean_contrast",
    ):
        table.add_row(key, *[f"{results[s][key]:.4g}" for s in sources])
    console.print(table)
    grids = []
    for name, x in images.items():
        p = out / f"grid-{name.split()[0].lower().replace('-', '')}.png"
        save_image_grid(x[:64], p)
        grids.append(p)
    _side_by_side(grids, out / "grids-side-by-side.png")
    atomic_write_json(
        out / "summary.json", {"budget_images": budget, "samples": n, "feature_space": fs.label, "results": results}
    )
    console.print(f"image grids (teacher, initial, EMD, Diff-Instruct, real): {out / 'grids-side-by-side.png'}")
    return results
