"""`emdctl distill` and `emdctl teacher train`: set up the process group, the run directory (locked,
then checked against its recipe) and the method, then train on the shared loop (emdctl.trainer)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..runs import RunDir
from ..trainer import Trainer


def run_recipe(
    recipe,
    run_dir: Path | None = None,
    runs_root: Path = Path("runs"),
    resume: bool = False,
    force: bool = False,
    console: Console | None = None,
    threads: str | int | None = None,
) -> tuple[RunDir, dict]:
    """Everything `emdctl distill` / `emdctl teacher train` do after parsing: set up the process
    group, the run directory and the method, then train (resuming when a checkpoint exists).
    `threads` overrides the recipe's CPU thread setting (it changes no result, so it is not part
    of the recipe a run directory is checked against)."""
    from .. import distributed, runs
    from ..methods import build_method
    from ..precision import configure_backends
    from ..threads import cpu_threads

    console = console or Console(stderr=True)
    with distributed.session(recipe.device) as dist:
        configure_backends(recipe.precision.tf32)
        run = RunDir(Path(run_dir) if run_dir is not None else Path(runs_root) / recipe.name)
        if dist.is_main:
            run.lock()  # before anything of the directory is read or changed: a refused command changes nothing
            try:
                runs.prepare(recipe, run, resume=resume, force=force)
            except BaseException:
                run.unlock()
                raise
        dist.barrier()
        try:
            teacher = None
            if recipe.kind == "distill":
                from ..teachers import recipe_teacher

                def warn(text):
                    if dist.is_main:
                        console.print(f"[yellow]{text}[/]", highlight=False)

                teacher = recipe_teacher(recipe, dist.device, run.root, warn)
                if dist.is_main:
                    console.print(f"teacher: {teacher.source}", highlight=False)
                    _advise_on_level(recipe, teacher, console)
            method = build_method(recipe, dist, teacher)
            is_vector = teacher is not None and not teacher.is_image
            with cpu_threads(threads or recipe.threads, is_vector, dist.device) as described:
                if dist.is_main:
                    console.print(
                        f"run directory: {run.root}  (device {dist.device}, {dist.world_size} process(es)"
                        + (f"; {described})" if described else ")"),
                        highlight=False,
                    )
                summary = Trainer(recipe, method, run, console).run_training()
        finally:
            run.unlock()
    return run, summary


def _advise_on_level(recipe, teacher, console) -> None:
    """Say when method.pin_level does not suit the teacher (docs/algorithm.md)."""
    if not recipe.method.can_pin_level or recipe.teacher.is_mixture:  # (a mixture is never blind)
        return
    blind, pinned = teacher.follows_level_shifts(), recipe.method.levels_pinned()
    if blind and not pinned:
        console.print(
            "[yellow]teacher: its denoiser follows any shift of an image's mean level (D(x + c) = D(x) + c), so "
            "its score cannot see that level and the student's level can drift without bound; consider "
            "method.pin_level: true[/]",
            highlight=False,
        )
    elif pinned and not blind:
        console.print(
            "[yellow]method.pin_level: this teacher does see an image's mean level; pinning keeps the student "
            "from learning it (remove pin_level unless that is intended)[/]",
            highlight=False,
        )
