"""`emdctl demo text-loop`: the text-to-image quality loop on a labelled dataset (issue 38).

A text-conditioned diffusers teacher (trained by a `teacher-train-text` recipe, or given) is sampled
with classifier-free guidance at each scale w, many steps, on every phrasing of its prompt set; each
method distills it at the same w, on the same budget and seeds, and is sampled in one step on the
same seeds and prompts (seed s takes prompt s mod P). Every model, the initial generator and the
teacher included, is measured on the same images: prompt adherence (the share the classifier
assigns to the prompted class), FD to the teacher's guided samples at that w and to the real data,
and recall to the real data, all in the classifier's feature space (`emdctl evaluate
train-features`). Over several seeds every number is a mean with its standard deviation.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from ..recipe import parse_recipe
from ..storage import atomic_write_json
from .demo import (
    LOOP_LABELS,
    REAL_DATA_METHODS,
    _side_by_side,
    _variants,
    loop_inputs,
    save_initial_generator,
    train_teacher_first,
)
from .distill import run_recipe

QUANTITIES = ("adherence", "FD to teacher", "FD to real", "recall to real")


def demo_text_loop(
    distill_recipe: Path,
    data: Path,
    out: Path,
    guidance: tuple[float, ...] = (1.0, 2.0, 4.0),
    methods: tuple[str, ...] = ("emd", "diff-instruct"),
    seeds: tuple[int, ...] = (0,),
    budget: int | None = None,
    n: int = 1000,
    teacher_steps: int = 32,
    teacher_train: Path | None = None,
    features: Path | None = None,
    device: str = "auto",
    console: Console | None = None,
) -> dict:
    from ..conditioning import read_prompts
    from ..distributed import resolve_device
    from ..evaluation.adherence import adherence, prompt_classes
    from ..evaluation.classifier import load_feature_net, train_feature_net
    from ..evaluation.clip import read_sample_folder
    from ..evaluation.fidelity import compute_metrics, open_feature_space, reference_from_features
    from ..evaluation.stats import images_of
    from ..teachers import recipe_teacher
    from .sample import sample_command

    console = console or Console(stderr=True)
    needs_images = [m for m in methods if m in REAL_DATA_METHODS]
    if needs_images:  # refused before anything is trained or sampled
        raise UserError(
            f"--methods: {', '.join(needs_images)} train against real images with captions "
            "(method.data.captions), which the text loop does not make; use "
            + ", ".join(m for m in LOOP_LABELS if m not in REAL_DATA_METHODS)
        )
    dev = resolve_device(device)
    out = Path(out)
    base = loop_inputs(out, data, distill_recipe)
    if teacher_train is not None:
        trained = train_teacher_first(teacher_train, out, console, "teacher-train-text")
        base["teacher"] = {**base.get("teacher", {}), "kind": "diffusers", "path": str(trained)}
    teacher_dir = Path(base.get("teacher", {}).get("path") or "")
    prompts_txt, prompts_json = teacher_dir / "prompts.txt", teacher_dir / "prompts.json"
    if base.get("teacher", {}).get("kind") != "diffusers" or not prompts_json.is_file():
        raise UserError(
            f"{distill_recipe}: teacher must be a text teacher from `emdctl teacher train` of a "
            "teacher-train-text recipe (a diffusers pipeline with prompts.txt and prompts.json)"
        )
    base["data"] = {"prompts": str(prompts_txt)}
    r = parse_recipe(base, str(distill_recipe))  # a bad recipe fails here, before anything is trained
    budget = budget or r.duration
    prompts, classes = read_prompts(prompts_txt), prompt_classes(prompts_json)
    seed_list = list(range(n))

    features = Path(features or out / "features.safetensors")
    if not features.exists():
        console.print(f"training the classifier feature space on {data}")
        train_feature_net(data, features, epochs=3, device=str(dev), log=lambda m: console.print(m))
    space = open_feature_space(f"classifier:{features}", device=dev)
    net, meta = load_feature_net(features)
    real = images_of(Path(data), n, device=dev)
    real_feats = space.extract_batched(real)
    ref_real = reference_from_features(real_feats, space, {})

    def sample(source=None, recipe_file=None, folder=None, steps=None):
        sample_command(source=source, teacher_recipe=recipe_file, seeds=seed_list, out_dir=folder, batch=256,
                       steps=steps, fmt="png", class_label=None, use_ema=True, sampler="auto", device_name=device,
                       show_progress=True, prompts_file=prompts_txt)  # fmt: skip
        return folder

    # The initial generator (the teacher's network at sigma*): what guidance w does not change.
    init_dir = out / "initial-generator"
    if not (init_dir / "config.json").exists():
        teacher = recipe_teacher(r, "cpu", out, warn=lambda m: None)
        save_initial_generator(teacher, r, init_dir, teacher.data, {"teacher": teacher.describe()})
        del teacher
    folders: dict[float, dict[str, list[Path]]] = {}
    for w in guidance:
        wdir = out / f"w{w:g}"
        wdir.mkdir(exist_ok=True)
        guided = copy.deepcopy(base)
        guided["teacher"]["guidance"] = {**guided["teacher"].get("guidance", {}), "scale": float(w)}
        recipe_file = wdir / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(guided, sort_keys=False))
        console.print(f"[bold]w = {w:g}[/]: teacher samples, {n} at {teacher_steps} steps", highlight=False)
        rows = {f"teacher ({teacher_steps} steps)": [sample(recipe_file=recipe_file, folder=wdir / "teacher-samples",
                                                            steps=teacher_steps)],
                "initial generator (1 step)": [sample(source=init_dir, folder=out / "initial-samples")]}  # fmt: skip
        for s in seeds:
            variants = _variants({**guided, "seed": int(s)}, budget, r.method.langevin.steps if r.method.name == "emd"
                                 else 8, methods)  # fmt: skip
            for name, v in variants.items():
                run_dir = wdir / f"seed-{s}" / name
                console.print(f"[bold]{name}[/], w = {w:g}, seed {s}: {budget:,} images", highlight=False)
                run_recipe(parse_recipe({**v, "name": f"text-{name}"}, f"demo ({name})"), run_dir=run_dir,
                           console=console)  # fmt: skip
                label = f"{LOOP_LABELS.get(name, name)} (1 step)"
                rows.setdefault(label, []).append(sample(source=run_dir, folder=run_dir / "samples"))
        folders[w] = rows

    measured: dict[Path, tuple] = {}  # each folder read and featurized once (the initial generator's serves every w)

    def read(path: Path):
        if path not in measured:
            imgs, texts = read_sample_folder(path)
            measured[path] = (imgs, texts, space.extract_batched(_nchw(imgs)))
        return measured[path]

    results: dict[str, dict] = {}
    floors: dict[str, float] = {}
    for w, rows in folders.items():
        teacher_feats = read(next(iter(rows.values()))[0])[2]
        ref_teacher = reference_from_features(teacher_feats, space, {})
        floors[f"{w:g}"] = _split_half_fd(teacher_feats, space, len(prompts))
        results[f"{w:g}"] = per_w = {}
        for label, paths in rows.items():
            per_seed = []
            for path in paths:
                imgs, texts, feats = read(path)
                per_seed.append({
                    "adherence": adherence(imgs, texts, classes, net, meta, dev)["adherence"],
                    "FD to teacher": compute_metrics(["fid"], feats, ref_teacher, space)["fd"],
                    "FD to real": compute_metrics(["fid"], feats, ref_real, space)["fd"],
                    "recall to real": compute_metrics(["prc"], feats, ref_real, space)["recall"],
                })  # fmt: skip
            per_w[label] = _summarize(per_seed)
            imgs, texts, _ = read(paths[0])
            _class_grid(imgs, texts, classes, out / f"w{w:g}" / f"grid-{_slug(label)}.png")
        _side_by_side([out / f"w{w:g}" / f"grid-{_slug(label)}.png" for label in rows], out / f"w{w:g}" / "grids.png")
    _print_tables(results, floors, console, budget, n, len(seeds), space.label)
    atomic_write_json(out / "summary.json", {
        "budget_images": budget, "samples": n, "teacher_steps": teacher_steps, "guidance": list(guidance),
        "methods": list(methods), "seeds": list(seeds), "feature_space": space.label, "prompts": len(prompts),
        "teacher_split_half_fd": floors, "results": results,
    })  # fmt: skip
    return results


def _split_half_fd(feats: dict, space, prompts: int) -> float | None:
    """FD between two halves of the teacher's samples: the even and the odd rounds through the prompt
    set (seed s has prompt s mod P, round s // P), so both halves hold every prompt equally often (a
    split by seed parity would put different phrasings on each side). The finite-sample floor
    against which FD-to-teacher differences are read; the teacher's own FD to itself is zero by
    construction and says nothing. None with fewer than two rounds (n < 2 P): no such split exists."""
    from ..evaluation.fidelity import compute_metrics, reference_from_features

    f = feats[space.distance_layer]
    if len(f) < 2 * prompts:
        return None
    first = (torch.arange(len(f)) // prompts) % 2 == 0
    a, b = {space.distance_layer: f[first]}, {space.distance_layer: f[~first]}
    return compute_metrics(["fid"], a, reference_from_features(b, space, {}), space)["fd"]


def _nchw(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).contiguous()


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def _summarize(per_seed: list[dict]) -> dict:
    out = {}
    for q in QUANTITIES:
        values = [row[q] for row in per_seed]
        out[q] = statistics.fmean(values)
        out[f"{q} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{q} per seed"] = values
    return out


def _class_grid(imgs: torch.Tensor, texts: list[str], classes: dict[str, int], out: Path, per_class: int = 8) -> None:
    """One row per class: the first images (uint8 NHWC, of the first seed's folder) prompted with that class."""
    from ..plots import save_image_grid

    rows = []
    for c in sorted(set(classes.values())):
        pick = [i for i, t in enumerate(texts) if classes.get(t) == c][:per_class]
        if pick:
            row = imgs[pick]
            pad = per_class - len(pick)
            if pad:
                row = torch.cat([row, torch.zeros(pad, *row.shape[1:], dtype=row.dtype)])
            rows.append(row)
    x = torch.cat(rows).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(x, out, nrow=per_class)


def _print_tables(results: dict, floors: dict, console: Console, budget: int, n: int, seeds: int,
                  space: str) -> None:  # fmt: skip
    for w, per_w in results.items():
        floor = f"{floors[w]:.4g}" if floors[w] is not None else "n/a (needs n >= 2 x prompts)"
        table = Table(title=f"w = {w}: {budget:,} training images per method, {n} samples per model, "
                            f"{seeds} seed(s) (mean, sd over seeds); {space}",
                      caption="the teacher's FD to itself is 0 by construction; FD between two halves of its "
                              f"samples (alternate rounds through the prompts): {floor}")  # fmt: skip
        table.add_column("model")
        for q in QUANTITIES:
            table.add_column(q, justify="right")
        for label, res in per_w.items():
            table.add_row(label, *[f"{res[q]:.4g}" + (f" ({res[q + ' sd']:.2g})" if res[q + " sd"] else "")
                                   for q in QUANTITIES])  # fmt: skip
        console.print(table)
