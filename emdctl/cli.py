"""The `emdctl` command line. It parses arguments and calls the library; it holds no logic.

User mistakes (emdctl.errors.UserError) print one line, `error: ...`, and exit with status 2.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import TrainingStopped, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="EM Distillation: distill a many-step diffusion model into a one-step generator.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Check and inspect recipes.")
teacher_app = typer.Typer(no_args_is_help=True, help="Teachers: convert official checkpoints, train new ones.")
evaluate_app = typer.Typer(no_args_is_help=True, help="FID/KID/IS/precision-recall (torch-fidelity) and mode metrics.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(teacher_app, name="teacher")
app.add_typer(evaluate_app, name="evaluate")
demo_app = typer.Typer(no_args_is_help=True, help="Demonstrations: distillation methods on the same budget.")
app.add_typer(demo_app, name="demo")

# Into a file or a pipe, rich would cut tables at 80 columns: there they get the width they need.
LOG_WIDTH = 240
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else LOG_WIDTH)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else LOG_WIDTH)


def handles_errors(fn):
    """Turn user errors into one line on stderr and exit status 2 (no traceback). Errors of the file
    system (a full disk, a path that cannot be created, no permission) are user errors too: one line
    naming the file and what the system said; whatever was written atomically before is intact."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            for line in e.message.splitlines():
                err.print(f"error: {line}", markup=False)
            raise typer.Exit(e.exit_code) from None
        except TrainingStopped as e:
            err.print(e.message, markup=False)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            err.print(f"error: {describe_os_error(e)}", markup=False)
            raise typer.Exit(UserError.exit_code) from None

    return wrapper


def describe_os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e) or e.__class__.__name__
    if e.errno == errno.ENOSPC:
        folder = f" in {Path(e.filename).parent}" if e.filename else ""
        return (
            f"no space left on the device{folder} (writing {e.filename or 'a file'}); everything written before is "
            "intact (a run keeps its last checkpoint); free space and re-run the same command to continue"
        )
    return f"{where}{what}"


def _version(value: bool):
    if value:
        from . import __version__

        out.print(f"emdctl {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """EM Distillation: distill a many-step diffusion model into a one-step generator."""


RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML file; omitted: the embedded default recipe.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a field, e.g. --set optim.lr_gen=2e-6 (repeatable; validated like the file).",
    ),
]
ThreadsOpt = Annotated[
    str,
    typer.Option(
        "--threads",
        metavar="auto|N",
        help="CPU threads: auto (1 for 2-D mixture problems, torch's default for images) or a number; "
        "results are the same at any count.",
    ),
]
RunThreadsOpt = Annotated[
    str | None,
    typer.Option("--threads", metavar="auto|N", help="CPU threads (default: the recipe's `threads`, auto)."),
]


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ExportFormat(StrEnum):
    safetensors = "safetensors"
    onnx = "onnx"
    torchscript = "torchscript"
    diffusers = "diffusers"


class BenchNet(StrEnum):
    ddpmpp = "ddpmpp"
    adm = "adm"
    ncsnpp = "ncsnpp"
    tiny = "tiny"
    mlp = "mlp"


class BenchDtype(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Preset(StrEnum):
    ring8_unequal = "ring8-unequal"
    ring8 = "ring8"
    grid25_unequal = "grid25-unequal"


DeviceOpt = Annotated[Device, typer.Option(help="Where to run.")]


def _threads(value: str | None):
    from .threads import parse_threads

    return parse_threads(value)


def _new_file(path: Path | None, option: str) -> Path | None:
    """An output file the user names: its folder must exist (nothing is created elsewhere)."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist; create it first")
    return path


def _out_dir(path: Path, option: str = "--out") -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a directory; give a folder")
    return path


# --------------------------------------------------------------------------------------------
# distill


@app.command()
@handles_errors
def distill(
    recipe: RecipeArg = None,
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default: RUNS_ROOT/<recipe name>).")] = None,
    runs_root: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue an existing run even though its recipe differs.")] = False,
    force: Annotated[bool, typer.Option(help="Move an existing run with another recipe aside and start over.")] = False,
    threads: RunThreadsOpt = None,
):
    """Distill a teacher into a one-step generator (EMD; baselines Diff-Instruct, Moment Matching, GDD).

    Re-running the same command resumes from the last checkpoint. The run directory receives the
    resolved recipe, metrics.jsonl, checkpoints, PNG previews and, at the end, generator/.
    """
    n_threads = _threads(threads)
    from .commands.distill import run_recipe
    from .recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    if r.kind != "distill":
        raise UserError(f"{recipe}: kind is {r.kind!r}; use `emdctl teacher train` for teacher recipes")
    run_recipe(r, run_dir=run_dir, runs_root=runs_root, resume=resume, force=force, console=err, threads=n_threads)


# --------------------------------------------------------------------------------------------
# recipe


@recipe_app.command("validate")
@handles_errors
def recipe_validate(file: Annotated[Path, typer.Argument(help="Recipe YAML file.")], set_: SetOpt = None):
    """Check a recipe; prints `ok` or one line per problem (exit status 2)."""
    from .recipe import load_recipe

    r = load_recipe(file, set_ or [])
    out.print(f"ok: {file} ({r.kind}, name {r.name})")


@recipe_app.command("show")
@handles_errors
def recipe_show(file: RecipeArg = None, set_: SetOpt = None):
    """Print the fully resolved recipe, every default filled in (as YAML)."""
    from .memory import recipe_estimate
    from .recipe import dump_recipe, load_recipe

    r = load_recipe(file, set_ or [])
    out.print(dump_recipe(r), end="", markup=False)
    estimate = recipe_estimate(r)
    if estimate:
        out.print(f"# {estimate}", markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# teacher


@teacher_app.command("convert")
@handles_errors
def teacher_convert(
    source: Annotated[str, typer.Argument(help="An EDM network pickle (edm-*.pkl), its URL, or an official name.")],
    out_dir: Annotated[Path, typer.Argument(help="Output model directory (model.safetensors + config.json).")],
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the pickle.")] = None,
):
    """Convert an official NVlabs/edm pickle to safetensors + JSON, without executing its code."""
    from .teachers.convert import convert_edm_pickle

    path = convert_edm_pickle(source, out_dir, sha256)
    out.print(f"wrote {path}")


@teacher_app.command("train")
@handles_errors
def teacher_train(
    recipe: Annotated[Path, typer.Argument(help="A teacher recipe (kind: teacher-train or teacher-train-text).")],
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default: RUNS_ROOT/<recipe name>).")] = None,
    runs_root: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue an existing run even though its recipe differs.")] = False,
    force: Annotated[bool, typer.Option(help="Move an existing run with another recipe aside and start over.")] = False,
    threads: RunThreadsOpt = None,
):
    """Train a teacher on a dataset: EDM-style (teacher-train), or a text-conditioned diffusers
    pipeline from a labelled dataset (teacher-train-text); EMA, auto-resume."""
    n_threads = _threads(threads)
    from .commands.distill import run_recipe
    from .recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    if r.kind not in ("teacher-train", "teacher-train-text"):
        raise UserError(f"{recipe}: kind is {r.kind!r}; use `emdctl distill` for distillation recipes")
    run_recipe(r, run_dir=run_dir, runs_root=runs_root, resume=resume, force=force, console=err, threads=n_threads)


# --------------------------------------------------------------------------------------------
# sample


def _seeds(seeds: str | None, n: int | None, default_n: int | None = None):
    """--seeds or --n (seeds 0..n-1), never both; checked before anything heavy is imported."""
    from .seeds import parse_seeds

    if seeds is not None and n is not None:
        raise UserError(f"give --n {n} (seeds 0..{n - 1}) or --seeds {seeds}, not both")
    if seeds is not None:
        try:
            return parse_seeds(seeds)
        except ValueError as e:
            raise UserError(f"--seeds {seeds!r}: {e} (use e.g. 0-49999 or 0,1,2)") from None
    n = default_n if n is None else n
    if n is None:
        raise UserError("give --n (number of images, seeds 0..n-1) or --seeds")
    if n < 1:
        raise UserError(f"--n {n}: give at least 1 image (seeds 0..n-1)")
    from .seeds import Seeds

    return Seeds.first(n)


class SampleFormat(StrEnum):
    png = "png"
    npz = "npz"
    both = "both"


class TeacherSampler(StrEnum):
    auto = "auto"
    heun = "heun"
    euler = "euler"
    ddpm = "ddpm"


@app.command()
@handles_errors
def sample(
    source: Annotated[
        Path | None,
        typer.Argument(help="A run directory or an exported generator (default: the newest finished run in runs/)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("samples"),
    n: Annotated[int | None, typer.Option("--n", help="Number of images (seeds 0..n-1).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds, e.g. 0-49999 or 0,5,7 (one image per seed).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per forward pass (does not change the pixels).")] = 256,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Sampler steps (default: the generator's trained count; teacher: 18 Heun/Euler, all DDPM)."
        ),
    ] = None,
    fmt: Annotated[
        SampleFormat, typer.Option("--format", help="png (sub-folders of 1000), npz ([N,H,W,C] uint8) or both.")
    ] = SampleFormat.png,
    class_label: Annotated[
        int | None, typer.Option("--class", help="Fixed class label (default: random per seed).")
    ] = None,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights of a run.")] = True,
    teacher: Annotated[
        Path | None, typer.Option(help="Sample the teacher named by this distillation recipe instead.")
    ] = None,
    sampler: Annotated[TeacherSampler, typer.Option(help="Teacher sampler.")] = TeacherSampler.auto,
    device: DeviceOpt = Device.auto,
    keep_float: Annotated[
        bool, typer.Option(help="Also store the unclipped float32 images in samples.npz (arr_float).")
    ] = False,
    threads: ThreadsOpt = "auto",
    force: Annotated[
        bool, typer.Option(help="An --out folder holding other samples is moved aside (otherwise refused).")
    ] = False,
    prompt: Annotated[str | None, typer.Option(help="Text-conditioned generators: the prompt of every image.")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text-conditioned generators: a prompt file (lines or JSONL); seed s takes prompt s mod N."),
    ] = None,
):
    """Generate images, each a pure function of its seed; re-running resumes finished shards.

    Examples: emdctl sample runs/cifar10 --n 50000 --format npz;
    emdctl sample --teacher recipes/mnist.yaml --steps 1000 --n 64 --out teacher-samples
    """
    seed_list = _seeds(seeds, n)
    _out_dir(out_dir)
    n_threads = _threads(threads)
    if source is not None and teacher is not None:
        raise UserError(f"give a source ({source}) or --teacher {teacher}, not both")
    if keep_float and fmt is SampleFormat.png:
        raise UserError("--keep-float stores floats in samples.npz: add --format npz or --format both")
    from .commands.sample import sample_command

    summary = sample_command(
        source=source,
        teacher_recipe=teacher,
        seeds=seed_list,
        out_dir=out_dir,
        batch=batch,
        steps=steps,
        fmt=fmt.value,
        class_label=class_label,
        use_ema=ema,
        sampler=sampler.value,
        device_name=device,
        keep_float=keep_float,
        threads=n_threads,
        log=lambda m: err.print(m, markup=False, highlight=False),
        force=force,
        prompt=prompt,
        prompts_file=prompts,
    )
    rate = summary.get("images_per_s")
    out.print(
        f"{summary['images']} images in {out_dir}" + (f" ({rate:.1f} img/s)" if rate else " (all shards were done)")
    )
    if summary.get("preview"):
        out.print(f"preview: {summary['preview']}")


# --------------------------------------------------------------------------------------------
# export


@app.command()
@handles_errors
def export(
    source: Annotated[Path, typer.Argument(help="A run directory (or an exported generator directory).")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="The artifact.")] = ExportFormat.safetensors,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: SOURCE/export-FORMAT).")
    ] = None,
    ema: Annotated[bool, typer.Option(help="Export the EMA weights (default) or the raw generator.")] = True,
    lora: Annotated[
        bool, typer.Option(help="--format diffusers: also write the LoRA adapters alone (pytorch_lora_weights).")
    ] = False,
):
    """Export the generator: weights + JSON config (safetensors), a portable ONNX/TorchScript module,
    or (students of diffusers teachers) a diffusers pipeline directory."""
    from .commands.export import export_command

    result = export_command(source=source, fmt=fmt, out=out_dir or Path(source) / f"export-{fmt}", use_ema=ema,
                            lora_file=lora)  # fmt: skip
    out.print(f"wrote {result['path']}")
    if result.get("verified"):
        v = result["verified"]
        out.print(f"onnxruntime matches torch: max |diff| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g})")


# --------------------------------------------------------------------------------------------
# evaluate


FeaturesOpt = Annotated[
    str | None,
    typer.Option(
        help="Feature space: inception, or classifier:PATH (offline, emdctl-trained); default: the run's recipe's "
        "evaluation.features, else inception."
    ),
]
WeightsOpt = Annotated[Path | None, typer.Option(help="Inception-v3 weights file (torch-fidelity's or pytorch-fid's).")]
SourceArg = Annotated[
    Path | None,
    typer.Argument(
        help="A run/generator directory (ONNX/TorchScript exports too), image folder, npz, EDM zip or MNIST idx "
        "(default: the newest finished run in runs/)."
    ),
]


MAX_EVALUATED = 10_000_000  # samples an evaluation holds (features or points) in memory


def _ranges(seeds: list[str] | None, n: int):
    ranges = [_seeds(s, None) for s in seeds] if seeds else None
    if max([len(r) for r in ranges] if ranges else [n]) > MAX_EVALUATED:
        raise UserError(f"an evaluation holds its samples' features in memory; give at most {MAX_EVALUATED:,} per run")
    return ranges


def _evaluate(metric, source, ref, ref_n, features, n, seeds, batch, steps, ema, weights, device, json_out, threads):
    """The metric commands after parsing: arguments checked first, then torch-fidelity."""
    ranges = _ranges(seeds, n)
    _new_file(json_out, "--json")
    n_threads = _threads(threads)
    from .commands.evaluate import evaluate_and_report

    evaluate_and_report(
        metrics=[metric], source=source, ref=ref, features=features, n=n, seed_ranges=ranges, batch=batch,
        device=device, steps=steps, inception_weights=weights, ema=ema, json_out=json_out, console=out,
        threads=n_threads, ref_n=ref_n,
    )  # fmt: skip


def _metric_command(metric: str):
    def command(
        source: SourceArg = None,
        ref: Annotated[
            Path | None,
            typer.Option(
                help="Reference: a dataset or statistics from `evaluate ref`; required unless the run's recipe "
                "names evaluation.reference."
            ),
        ] = None,
        ref_n: Annotated[
            int | None,
            typer.Option("--ref-n", min=1, help="Use the first N images of a reference dataset (default: all)."),
        ] = None,
        features: FeaturesOpt = None,
        n: Annotated[
            int,
            typer.Option(
                "--n", min=1, help="Samples per seed range (generators), images used (datasets, the reference too)."
            ),
        ] = 50000,
        seeds: Annotated[
            list[str] | None, typer.Option(help="Seed ranges (repeatable; min and mean reported).")
        ] = None,
        batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 256,
        steps: Annotated[
            int | None, typer.Option(min=1, help="Sampler steps of the generator (default: its trained count).")
        ] = None,
        ema: Annotated[bool, typer.Option(help="Use a run's EMA weights.")] = True,
        inception_weights: WeightsOpt = None,
        device: DeviceOpt = Device.auto,
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
        threads: ThreadsOpt = "auto",
    ):
        _evaluate(metric, source, ref, ref_n, features, n, seeds, batch, steps, ema, inception_weights, device,
                  json_out, threads)  # fmt: skip

    command.__doc__ = {
        "fid": "Frechet distance (FID in the Inception space) against a reference.",
        "kid": "Kernel Inception Distance (polynomial-kernel MMD) against a reference.",
        "prc": "Precision and recall (k-NN manifolds, k=3) against a reference.",
        "all": "FID, KID, IS and precision/recall in one pass over the features.",
    }[metric]
    return handles_errors(command)


for _metric in ("fid", "kid", "prc", "all"):
    evaluate_app.command(_metric)(_metric_command(_metric))


@evaluate_app.command("isc")
@handles_errors
def evaluate_isc(
    source: SourceArg = None,
    features: FeaturesOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per seed range (generators) or images used.")] = 50000,
    seeds: Annotated[list[str] | None, typer.Option(help="Seed ranges (repeatable; min and mean reported).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 256,
    steps: Annotated[int | None, typer.Option(min=1, help="Sampler steps of the generator.")] = None,
    ema: Annotated[bool, typer.Option(help="Use a run's EMA weights.")] = True,
    inception_weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    threads: ThreadsOpt = "auto",
):
    """Inception Score of the samples (no reference)."""
    _evaluate("isc", source, None, None, features, n, seeds, batch, steps, ema, inception_weights, device, json_out,
              threads)  # fmt: skip


@evaluate_app.command("ref")
@handles_errors
def evaluate_ref(
    dataset: Annotated[Path, typer.Argument(help="EDM zip, image folder, MNIST idx files or npz.")],
    out_file: Annotated[Path, typer.Option("--out", help="Output statistics file (.safetensors).")],
    features: FeaturesOpt = "inception",
    n: Annotated[int | None, typer.Option("--n", help="Use the first N images (default: all).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 256,
    inception_weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = "auto",
):
    """Compute and cache reference statistics (mu, sigma and features) of a dataset."""
    if out_file.suffix != ".safetensors":
        raise UserError(f"--out {out_file}: reference statistics are written as .safetensors")
    _new_file(out_file, "--out")
    if n is not None and n < 1:
        raise UserError(f"--n {n}: give at least 1 image")
    n_threads = _threads(threads)
    from .data import open_dataset
    from .distributed import resolve_device
    from .evaluation.fidelity import open_feature_space, reference_of_dataset, save_reference
    from .threads import cpu_threads

    dev = resolve_device(device)
    fs = open_feature_space(features or "inception", inception_weights, dev)
    ds = open_dataset(dataset, use_labels=False)
    used = min(len(ds), n or len(ds))
    with cpu_threads(n_threads, False, dev):
        ref = reference_of_dataset(fs, ds, dataset, batch, used)
    save_reference(ref, out_file)
    out.print(f"wrote {out_file} ({used:,} of {len(ds):,} images, {fs.label})")


@evaluate_app.command("train-features")
@handles_errors
def evaluate_train_features(
    data: Annotated[Path, typer.Option(help="A labelled dataset: MNIST idx directory, EDM zip with labels, ...")],
    out_file: Annotated[Path, typer.Option("--out", help="Output feature file (.safetensors).")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 2e-3,
    max_images: Annotated[int | None, typer.Option(help="Use at most this many images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: DeviceOpt = Device.auto,
):
    """Train the offline classifier feature space (registered with torch-fidelity as emdctl-classifier)."""
    if epochs < 1 or batch < 1 or lr <= 0:
        raise UserError("--epochs and --batch must be positive and --lr above zero")
    _new_file(out_file, "--out")
    from .distributed import resolve_device
    from .evaluation.classifier import WEAK_ACCURACY, train_feature_net

    info = train_feature_net(
        data, out_file, epochs, batch, lr, seed, str(resolve_device(device)), max_images, log=lambda m: err.print(m)
    )
    out.print(
        f"wrote {info['path']} (held-out accuracy {info['held_out_accuracy']:.4f}); distances in this space "
        "compare models with each other, not with published FID"
    )
    if info["held_out_accuracy"] < WEAK_ACCURACY:
        err.print(
            f"[yellow]warning: held-out accuracy {info['held_out_accuracy']:.2f} is below {WEAK_ACCURACY}: features "
            f"that do not tell the classes apart make weak distances; train on more images or for more --epochs[/]"
        )


@evaluate_app.command("modes")
@handles_errors
def evaluate_modes(
    sources: Annotated[list[Path], typer.Argument(help="Run or generator directories of a mixture distillation.")],
    n: Annotated[int | None, typer.Option("--n", help="Samples per generator (seeds 0..n-1; default 20000).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds (instead of --n).")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a scatter plot here (PNG; with several sources, NAME-1.png, ...).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    ema: Annotated[bool, typer.Option(help="Use a run's EMA weights (--no-ema: the raw generator).")] = True,
    within: Annotated[
        float, typer.Option(min=0.5, max=10.0, help="A sample counts for a mode within this many of its scales.")
    ] = 3.0,
    threads: ThreadsOpt = "auto",
):
    """Per-mode mass within 3 scales of each mode, its total variation to the exact mixture's, mode
    recall, off-mode mass, mode spread and sliced Wasserstein (mixtures)."""
    seed_list = _seeds(seeds, n, default_n=20000)
    if len(seed_list) > MAX_EVALUATED:
        raise UserError(f"{len(seed_list):,} samples: mode metrics hold them in memory; give at most {MAX_EVALUATED:,}")
    _new_file(plot, "--plot")
    _new_file(json_out, "--json")
    n_threads = _threads(threads)
    from .commands.evaluate import modes_and_report

    modes_and_report(
        sources=sources,
        seeds=seed_list,
        plot=plot,
        json_out=json_out,
        console=out,
        use_ema=ema,
        within=within,
        threads=n_threads,
    )


@evaluate_app.command("clip")
@handles_errors
def evaluate_clip(
    samples: Annotated[
        Path, typer.Argument(help="A sample folder of `emdctl sample --prompt/--prompts` (index.jsonl).")
    ],
    clip: Annotated[str, typer.Option(help="A transformers CLIPModel directory, or a hub id already in the cache.")],
    n: Annotated[int | None, typer.Option("--n", help="Score the first N images (default: all).")] = None,
    device: DeviceOpt = Device.auto,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result here.")] = None,
):
    """CLIP score of generated images against their prompts (100 x cosine, clipped at 0, averaged)."""
    _new_file(json_out, "--json")
    from .commands.evaluate import clip_command

    result = clip_command(samples=samples, clip=clip, n=n, device=device, json_out=json_out)
    out.print(f"CLIP score {result['clip_score']:.3f} (sd {result['clip_score_sd']:.3f}) over {result['n']} images "
              f"of {result['prompts']} prompts; model {clip}")  # fmt: skip


@evaluate_app.command("adherence")
@handles_errors
def evaluate_adherence(
    samples: Annotated[
        Path, typer.Argument(help="A sample folder of `emdctl sample --prompt/--prompts` (index.jsonl).")
    ],
    prompts_json: Annotated[
        Path, typer.Option("--prompts-json", help="The teacher's prompts.json (class -> phrasings).")
    ],
    features: Annotated[Path, typer.Option(help="A classifier feature file (`emdctl evaluate train-features`).")],
    device: DeviceOpt = Device.auto,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result here.")] = None,
):
    """Prompt adherence: the share of images the classifier assigns to the class their prompt names."""
    _new_file(json_out, "--json")
    from .distributed import resolve_device
    from .evaluation.adherence import adherence_of_folder
    from .storage import atomic_write_json

    result = adherence_of_folder(samples, prompts_json, features, resolve_device(device))
    if json_out is not None:
        atomic_write_json(json_out, result)
    out.print(f"prompt adherence {result['adherence']:.3f} (se {result['adherence_se']:.3f}) over {result['n']} images")


@evaluate_app.command("stats")
@handles_errors
def evaluate_stats(
    sources: Annotated[list[Path], typer.Argument(help="Generators (run/export directories) or image sets.")],
    n: Annotated[int, typer.Option("--n", help="Images per source.")] = 1024,
    device: DeviceOpt = Device.auto,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    ema: Annotated[bool, typer.Option(help="Use a run's EMA weights (--no-ema: the raw generator).")] = True,
    shift_background: Annotated[
        bool,
        typer.Option(help="Shift each image's level so its median pixel is black first (teachers blind to it)."),
    ] = False,
):
    """Pixel statistics: brightness, contrast and the fraction of flat (degenerate) images."""
    _new_file(json_out, "--json")
    from .commands.evaluate import stats_command

    stats_command(
        sources=sources, n=n, device=device, json_out=json_out, use_ema=ema, shift=shift_background, console=out
    )


# --------------------------------------------------------------------------------------------
# demo


MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        help="Comma-separated methods on the same budget and seeds, each paired with EMD "
        "(emd, diff-instruct, moment-matching, gdd, sid, sida, dmd2).",
    ),
]


@demo_app.command("mixture")
@handles_errors
def demo_mixture_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Where both runs and the plots go.")] = Path(
        "runs/demo-mixture"
    ),
    budget: Annotated[str, typer.Option(help="Training images per method (e.g. 1M).")] = "1M",
    preset: Annotated[Preset, typer.Option(help="The mixture.")] = Preset.ring8_unequal,
    k: Annotated[int, typer.Option("--k", help="Langevin steps K of EMD.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of both runs.")] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(help="Several seeds, e.g. 0-29: both runs per seed (in OUT/seed-S), then paired statistics."),
    ] = None,
    eval_every: Annotated[
        str, typer.Option(help="Also evaluate during training every so many images (e.g. 50k; 0: off).")
    ] = "0",
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field of both runs' recipe, e.g. fake_score.steps_per_iteration=5."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --seeds: run this many seeds at once, one CPU thread each (the same results; "
            "e.g. the number of cores).",
        ),
    ] = 1,
    methods: MethodsOpt = "emd,diff-instruct",
):
    """Distillation methods (by default EMD and Diff-Instruct) distil an analytic mixture on the same
    budget and seeds; mode metrics side by side, paired statistics against EMD over --seeds."""
    from .commands.demo import demo_mixture, demo_mixture_seeds, mixture_base, parse_methods
    from .seeds import parse_seeds

    every, images = _budget(eval_every, "--eval-every"), _budget(budget)
    names = parse_methods(methods)
    base = mixture_base(sets or [], images)
    if seeds is None and jobs != 1:
        raise UserError("--jobs runs several seeds at once: give --seeds too")
    if seeds is None:
        demo_mixture(out=out_dir, budget=images, preset=preset, steps=k, seed=seed, console=err, base=base,
                     eval_every=every, methods=names)  # fmt: skip
        return
    if seed != 0:
        raise UserError("give --seed (one comparison) or --seeds (several, with paired statistics), not both")
    try:
        seed_list = list(parse_seeds(seeds))
    except ValueError as e:
        raise UserError(f"--seeds {seeds!r}: {e} (use e.g. 0-29 or 0,3,5)") from None
    demo_mixture_seeds(
        out=out_dir,
        budget=images,
        preset=preset,
        steps=k,
        seeds=seed_list,
        console=err,
        base=base,
        eval_every=every,
        jobs=jobs,
        methods=names,
    )


@demo_app.command("loop")
@handles_errors
def demo_loop_cmd(
    recipe: Annotated[Path, typer.Argument(help="The distillation recipe (its teacher, unless --teacher-train).")],
    data: Annotated[Path, typer.Option(help="The real, labelled images: EDM zip, MNIST directory, ...")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where everything goes.")] = Path("runs/demo-loop"),
    teacher_train: Annotated[Path | None, typer.Option(help="Train this teacher first (teacher-train recipe).")] = None,
    budget: Annotated[str | None, typer.Option(help="Training images per method (default: the recipe's).")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per model (10k-50k for real evaluations).")] = 10000,
    teacher_steps: Annotated[int, typer.Option(help="Teacher sampler steps (Heun/Euler; DDPM for discrete).")] = 35,
    features: Annotated[Path | None, typer.Option(help="A classifier feature file (trained here if absent).")] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Also report Inception FID with these weights.")
    ] = None,
    device: DeviceOpt = Device.auto,
    shift_background: Annotated[
        bool,
        typer.Option(help="Also evaluate with each image's level shifted so its median pixel is black."),
    ] = False,
    methods: MethodsOpt = "emd,diff-instruct",
):
    """The quality loop: [train teacher] -> features -> teacher samples -> every method on the same
    budget -> FD to teacher and data, recall, flat-image fraction, side by side (resumable)."""
    from .commands.demo import demo_loop, parse_methods

    demo_loop(
        out=out_dir,
        distill_recipe=recipe,
        data=data,
        budget=_budget(budget) if budget else None,
        n=n,
        teacher_steps=teacher_steps,
        teacher_train=teacher_train,
        features=features,
        inception_weights=inception_weights,
        device=device,
        console=err,
        shift_background=shift_background,
        methods=parse_methods(methods),
    )


@demo_app.command("text-loop")
@handles_errors
def demo_text_loop_cmd(
    recipe: Annotated[Path, typer.Argument(help="The distillation recipe (a text teacher, unless --teacher-train).")],
    data: Annotated[Path, typer.Option(help="The real, labelled images (MNIST directory, EDM zip, ...).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where everything goes.")] = Path("runs/demo-text-loop"),
    teacher_train: Annotated[
        Path | None, typer.Option(help="Train this teacher first (a teacher-train-text recipe).")
    ] = None,
    guidance: Annotated[str, typer.Option(help="Guidance scales w, comma-separated.")] = "1,2,4",
    budget: Annotated[str | None, typer.Option(help="Training images per method (default: the recipe's).")] = None,
    seeds: Annotated[str, typer.Option(help="Distillation seeds, e.g. 0-2.")] = "0",
    n: Annotated[int, typer.Option("--n", help="Samples per model (each prompt n / P times).")] = 1000,
    teacher_steps: Annotated[int, typer.Option(help="Teacher sampler steps (EDM's Heun).")] = 32,
    features: Annotated[Path | None, typer.Option(help="A classifier feature file (trained here if absent).")] = None,
    device: DeviceOpt = Device.auto,
    methods: MethodsOpt = "emd,diff-instruct",
):
    """The text-to-image quality loop: [train a text teacher] -> classifier -> guided teacher samples
    at each w -> every method at the same w and seeds -> prompt adherence, FD to the teacher and to the
    data, recall; per-class grids (resumable)."""
    from .commands.demo import parse_methods
    from .commands.demo_text import demo_text_loop

    try:
        scales = tuple(float(w) for w in guidance.split(","))
    except ValueError:
        raise UserError(f"--guidance {guidance}: give comma-separated numbers, e.g. 1,2,4") from None
    if any(w < 0 for w in scales):
        raise UserError(f"--guidance {guidance}: scales are at least 0")
    demo_text_loop(
        distill_recipe=recipe,
        data=data,
        out=out_dir,
        guidance=scales,
        methods=tuple(parse_methods(methods)),
        seeds=tuple(_seeds(seeds, None)),
        budget=_budget(budget) if budget else None,
        n=n,
        teacher_steps=teacher_steps,
        teacher_train=teacher_train,
        features=features,
        device=device,
        console=err,
    )


@demo_app.command("mnist")
@handles_errors
def demo_mnist_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Where runs, samples and plots go.")] = Path("runs/demo-mnist"),
    recipe: Annotated[Path, typer.Option(help="The recipe naming the MNIST teacher.")] = Path("recipes/mnist.yaml"),
    budget: Annotated[str | None, typer.Option(help="Training images per method (default: the recipe's).")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per model for the evaluation.")] = 1024,
    mnist: Annotated[Path, typer.Option(help="MNIST idx directory.")] = Path("../shared/data/mnist"),
    features: Annotated[Path | None, typer.Option(help="A classifier feature file (trained here if absent).")] = None,
    device: DeviceOpt = Device.auto,
    shift_background: Annotated[
        bool,
        typer.Option(help="Also evaluate with each image's level shifted so its median pixel is black."),
    ] = True,
):
    """The quality loop on the pretrained MNIST DDPM, its own 1000-step samples as the reference.

    The teacher's score cannot see an image's mean level, so its samples' levels are arbitrary (most
    clip to flat squares); the rows marked "shifted" compare every model after setting each image's
    median pixel to black, i.e. on what the teacher does define."""
    from .commands.demo import demo_loop

    images = _budget(budget) if budget else None
    demo_loop(out=out_dir, distill_recipe=recipe, data=mnist, budget=images, n=n, teacher_steps=1000, features=features,
              device=device, console=err, shift_background=shift_background)  # fmt: skip


def _budget(text: str, option: str = "--budget") -> int:
    from .recipe import parse_image_count

    try:
        return parse_image_count(text)
    except ValueError as e:
        raise UserError(f"{option} {text!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# bench


@app.command()
@handles_errors
def bench(
    net: Annotated[
        BenchNet, typer.Option(help="ddpmpp (CIFAR-10, 55.7M), adm (ImageNet-64, 295.9M), ncsnpp, tiny or mlp.")
    ] = BenchNet.tiny,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 8,
    k: Annotated[int, typer.Option("--k", help="Langevin steps K of the EMD iteration.")] = 8,
    dtype: Annotated[BenchDtype, typer.Option(help="Configured precision (autocast).")] = BenchDtype.bf16,
    compile: Annotated[bool, typer.Option(help="torch.compile the configured variant (GPU only).")] = True,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory layout for the configured variant.")] = True,
    fused: Annotated[bool, typer.Option(help="Fused Triton Langevin update in the configured variant (GPU).")] = True,
    iters: Annotated[int, typer.Option(help="Timed calls per measurement.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up calls (compilation happens here).")] = 2,
    device: DeviceOpt = Device.auto,
    sections: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of forward,backward,emd,langevin,sample, or shared-cpu: the default "
            "recipe with torch's thread defaults and with emdctl's policy, on idle cores and beside a CPU-bound "
            "process (about 2 minutes on 2 cores)."
        ),
    ] = "forward,backward,emd,langevin,sample",
    compare_unfused: Annotated[
        bool, typer.Option(help="Also time the EMD rows with the fused update off, in the same run (GPU).")
    ] = False,
    shared_images: Annotated[
        str, typer.Option(help="Images of the default recipe per run of the shared-cpu section (e.g. 200k).")
    ] = "200k",
    shared_competitors: Annotated[
        int, typer.Option(min=1, max=64, help="CPU-bound processes beside the shared-cpu section's runs.")
    ] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
):
    """Throughput of forward, forward+backward, an EMD-K iteration, its Langevin loop and one-step
    sampling, each as a ratio to the eager fp32 baseline measured in the same run."""
    from .bench import OPTIONAL_SECTIONS, SECTIONS
    from .commands.bench import bench_command

    chosen = tuple(x.strip() for x in sections.split(",") if x.strip())
    unknown = [x for x in chosen if x not in SECTIONS + OPTIONAL_SECTIONS]
    if unknown or not chosen:
        raise UserError(f"--sections {sections!r}: allowed are {', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    bench_command(
        net=net,
        batch=batch,
        k=k,
        device=device,
        dtype=dtype,
        compile=compile,
        channels_last=channels_last,
        fused=fused,
        iters=iters,
        warmup=warmup,
        sections=chosen,
        compare_unfused=compare_unfused,
        shared_images=_budget(shared_images, "--shared-images"),
        shared_competitors=shared_competitors,
        json_out=json_out,
        console=out,
        log=lambda m: err.print(m, markup=False),
    )


def main() -> None:
    """Console-script entry point."""
    # Before torch is imported: idle OpenMP threads sleep instead of spinning, so a run does not
    # collapse on cores that other processes use (emdctl.threads); the environment can still set it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
