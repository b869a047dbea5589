"""The shared training loop: every method (EMD, Diff-Instruct, EDM teacher training) runs on it.

Duration and cadences are counted in images seen. The loop resumes from the newest checkpoint of
the run directory, keeps an EMA (half-life in images, EDM's ramp-up), writes metrics.jsonl,
periodic PNG previews and checkpoints, and stops cleanly on SIGINT/SIGTERM (checkpoint first) or
on a non-finite loss/gradient (last good checkpoint kept, diagnostics written).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from rich.console import Console

from . import memory
from .checkpoint import CheckpointManager, flatten_optimizer, module_tensors, restore_module, restore_optimizer
from .errors import TrainingStopped, UserError
from .methods.base import Method, NonFiniteError
from .plots import save_curves
from .rng import derive_seed
from .runs import RunDir
from .storage import atomic_write_json

EXIT_NONFINITE = 3
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


class Trainer:
    def __init__(self, recipe, method: Method, run: RunDir, console: Console | None = None):
        self.recipe = recipe
        self.method = method
        self.run = run
        self.dist = method.dist
        self.console = console or Console(stderr=True)
        self.ckpt = CheckpointManager(run.root, recipe.checkpoint.keep)
        self.iteration = 0
        self.images = 0
        self.nan_skipped = 0
        self.consecutive_skips = 0
        self._stop_signal: int | None = None
        self._images_saved: int | None = None  # images of the last checkpoint written or restored

    # -- state -------------------------------------------------------------------------------------
    def state_tensors_and_meta(self) -> tuple[dict, dict]:
        tensors: dict[str, torch.Tensor] = {}
        optim_meta = {}
        shared = self.method.shared_with_teacher()
        for name, module in self.method.modules().items():
            tensors.update(module_tensors(f"net.{name}", module, shared))
        for name, opt in self.method.optimizers().items():
            t, m = flatten_optimizer(name, opt)
            tensors.update(t)
            optim_meta[name] = m
        meta = {
            "kind": self.recipe.kind,
            "iteration": self.iteration,
            "images": self.images,
            "nan_skipped": self.nan_skipped,
            "world_size": self.dist.world_size,
            "optimizers": optim_meta,
            "configs": self.method.configs(),
            "torch": torch.__version__,
        }
        return tensors, meta

    def save_checkpoint(self) -> Path | None:
        """Only a finite state is ever checkpointed: otherwise the run stops here, the last good
        checkpoint kept (every rank checks the same weights, so all stop together)."""
        bad = self.method.nonfinite_state()
        if bad is not None:
            last = self.ckpt.latest() if self.dist.is_main else None
            raise TrainingStopped(
                f"stopped at {self.images:,} images: {bad}, so it is not checkpointed; the last good checkpoint is "
                f"{last.name if last else '(none)'}; lower the learning rates and re-run with --force",
                EXIT_NONFINITE,
            )
        if not self.dist.is_main:
            self._images_saved = self.images
            return None
        tensors, meta = self.state_tensors_and_meta()
        path = self.ckpt.save(tensors, meta)
        self._images_saved = self.images
        return path

    def restore(self, path: Path | None = None) -> Path:
        tensors, meta = self.ckpt.load(path)
        source = str(path or self.ckpt.loaded)
        for note in self.ckpt.notes:
            self.log(f"[yellow]{note}[/]")
        self.ckpt.notes.clear()
        if meta.get("kind") != self.recipe.kind:
            raise UserError(f"{source}: a {meta.get('kind')!r} checkpoint cannot resume a {self.recipe.kind!r} run")
        shared = self.method.shared_with_teacher()
        for name, module in self.method.modules().items():
            restore_module(f"net.{name}", module, tensors, source, shared)
        for name, opt in self.method.optimizers().items():
            if name not in meta.get("optimizers", {}):
                raise UserError(f"{source}: has no state for optimizer {name!r}")
            restore_optimizer(
                name, opt, {k: v.to(self.dist.device) for k, v in tensors.items()}, meta["optimizers"][name]
            )
        self.iteration = int(meta["iteration"])
        self.images = int(meta["images"])
        self.nan_skipped = int(meta.get("nan_skipped", 0))
        self._images_saved = self.images
        return Path(source)

    # -- EMA ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        ema = self.recipe.ema
        half = ema.halflife
        if ema.rampup is not None:
            half = min(half, self.images * ema.rampup)
        beta = 0.5 ** (self.recipe.batch.size / max(half, 1e-8)) if half > 0 else 0.0
        for ema_net, net in self.method.ema_pairs():
            for pe, p in zip(ema_net.parameters(), net.parameters(), strict=True):
                if pe is not p:  # (a LoRA student's frozen base is one tensor shared by both)
                    pe.copy_(p.detach().lerp(pe, beta))
            for be, b in zip(ema_net.buffers(), net.buffers(), strict=True):
                be.copy_(b)

    # -- signals -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            last = self.ckpt.latest() if self.dist.is_main else None
            raise TrainingStopped(
                f"stopped by a second SIGINT at {self.images:,} images, without a new checkpoint; the last checkpoint "
                f"({last.name if last else 'none'}) holds the progress up to it; re-run the same command to resume",
                SIGNAL_EXIT[signal.SIGINT],
            )
        self._stop_signal = signum
        name = signal.Signals(signum).name
        if self.dist.world_size == 1 and self._images_saved == self.images:
            # Nothing trained since the last checkpoint, e.g. the first iteration is still inside
            # torch.compile (minutes on a GPU): stop now instead of after the iteration. (Single
            # process only: with several ranks every rank must stop at the same iteration.)
            raise TrainingStopped(
                f"stopped by {name} at {self.images:,} images, before another iteration finished; the last "
                "checkpoint holds all progress; re-run the same command to resume",
                SIGNAL_EXIT.get(signum, 143),
            )
        self.console.print(f"[yellow]received {name}: finishing this iteration, then checkpointing[/]")

    def _install_signals(self):
        previous = {}
        for sig in SIGNAL_EXIT:
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return previous

    # -- main loop ---------------------------------------------------------------------------------
    def run_training(self) -> dict:
        r = self.recipe
        latest = self.ckpt.latest()
        if latest is not None:
            path = self.restore()
            if self.dist.is_main:
                self.run.truncate_metrics(self.images)
            self.log(f"resuming from {path.name} (iteration {self.iteration}, {self.images:,} images seen)")
        else:
            self.method.initialize()
            if self.dist.is_main:
                self.run.truncate_metrics(-1)  # records of a start killed before its first checkpoint
            if r.logging.eval_every:
                self.evaluate()  # before the checkpoint, as at every crossing: a resume finds its record
            self.save_checkpoint()  # the initial state: there is always a last good checkpoint
        self.log(memory.describe(self.method, r))
        if self.images >= r.duration:
            self.log(f"already trained for {self.images:,} of {r.duration:,} images; nothing to do")
            return self.finish(final_checkpoint=False)

        if r.precision.compile and self.dist.device.type == "cuda":
            # Otherwise the run looks hung: DDPM++ took ~2.5 minutes on an H100 (docs/performance.md).
            self.log("torch.compile: the first iterations compile the networks, which can take minutes on a GPU")
        previous = self._install_signals()
        accum: dict[str, torch.Tensor] = {}
        accum_n = 0
        t_last, images_last = time.time(), self.images
        progress = self._progress()
        try:
            with progress:
                task = (
                    progress.add_task("training", total=r.duration, completed=self.images, unit="images")
                    if progress
                    else None
                )
                while self.images < r.duration:
                    torch.manual_seed(derive_seed(r.seed, self.iteration, "torch-global"))
                    try:
                        stats = self.method.train_step(self.iteration)
                        self.consecutive_skips = 0
                    except NonFiniteError as e:
                        stats = self.handle_nonfinite(e)
                    self.update_ema()
                    before = self.images
                    self.iteration += 1
                    self.images += r.batch.size
                    for k, v in stats.items():
                        accum[k] = accum.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else float(v))
                    accum_n += 1
                    if progress:
                        progress.update(task, completed=min(self.images, r.duration))
                    done = self.images >= r.duration
                    if _crossed(before, self.images, r.logging.every) or done:
                        now = time.time()
                        record = self.metrics_record(
                            accum, accum_n, (self.images - images_last) / max(now - t_last, 1e-9)
                        )
                        accum, accum_n, t_last, images_last = {}, 0, now, self.images
                        if self.dist.is_main:
                            self.run.append_metrics(record)
                            self.log(self.format_record(record), progress)
                    if self.dist.is_main and (_crossed(before, self.images, r.logging.grid_every) or done):
                        self.method.preview(self.run.root / "grids" / f"grid-{self.images:012d}.png")
                    if r.logging.eval_every and (_crossed(before, self.images, r.logging.eval_every) or done):
                        self.evaluate(progress)
                    if _crossed(before, self.images, r.checkpoint.every) and not done:
                        self.save_checkpoint()
                    stop = self.dist.broadcast_flag(self._stop_signal is not None)
                    if stop and not done:
                        path = self.save_checkpoint()
                        sig = self._stop_signal or signal.SIGTERM
                        raise TrainingStopped(
                            f"stopped by {signal.Signals(sig).name} at {self.images:,} images; checkpoint "
                            f"{path.name if path else '(rank 0)'} written; re-run the same command to resume",
                            SIGNAL_EXIT.get(sig, 143),
                        )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.finish()

    def evaluate(self, progress=None) -> None:
        """Evaluation records sit in metrics.jsonl beside the training records, as `emdctl evaluate`
        writes them, so a resumed run truncates them with the rest."""
        if not self.dist.is_main:
            return
        metrics = self.method.evaluate(self.recipe.logging.eval_samples)
        self.run.append_metrics(
            {"kind": "evaluation", "images": self.images, "iteration": self.iteration, "time": time.time(),
             "ema": True, **{f"eval/{k}": v for k, v in metrics.items()}}
        )  # fmt: skip
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("n", "nonfinite_fraction"))
        self.log(f"eval at {self.images:,} images: {shown}", progress)

    def finish(self, final_checkpoint: bool = True) -> dict:
        if final_checkpoint:
            self.save_checkpoint()
        summary = {"images": self.images, "iteration": self.iteration, "nan_skipped": self.nan_skipped}
        if self.dist.is_main:
            out = self.method.export(self.run.root / self.export_name())
            summary["exported"] = str(out)
            records = self.run.read_metrics()
            keys = {k for rec in records for k in rec if k.startswith(self.method.plotted)}
            keys -= {"eval/n", "eval/modes_covered", "eval/within_scales"}
            save_curves(records, sorted(keys), self.run.root / "curves.png")
            atomic_write_json(self.run.root / "summary.json", summary)
            self.log(f"done: {self.images:,} images; exported {out}")
        return summary

    def export_name(self) -> str:
        return "generator" if self.recipe.kind == "distill" else "teacher"

    # -- NaN / inf -----------------------------------------------------------------------------------
    def handle_nonfinite(self, e: NonFiniteError) -> dict:
        for opt in self.method.optimizers().values():
            opt.zero_grad(set_to_none=True)
        nan = self.recipe.nan
        self.nan_skipped += 1
        self.consecutive_skips += 1
        skippable = not e.quantity.startswith("weights/")  # the step has already been taken
        if nan.policy == "skip" and skippable and self.consecutive_skips <= nan.max_skips:
            self.log(
                f"[yellow]iteration {self.iteration}: {e.quantity} is {e.value}; "
                f"step skipped ({self.nan_skipped} so far)[/]"
            )
            return {"nan/skipped": torch.tensor(1.0)}
        diag = self.run.root / f"nonfinite-{self.iteration:09d}.json"
        if self.dist.is_main:
            atomic_write_json(
                diag,
                {
                    "iteration": self.iteration,
                    "images": self.images,
                    "quantity": e.quantity,
                    "value": str(e.value),
                    "diagnostics": e.diagnostics,
                },
            )
        last = self.ckpt.latest()
        why = "" if nan.policy == "stop" else f" after {nan.max_skips} consecutive skipped steps"
        raise TrainingStopped(
            f"stopped at iteration {self.iteration} ({self.images:,} images): {e.quantity} is {e.value}{why}; "
            f"the last good checkpoint is {last.name if last else '(none)'}; diagnostics in {diag}",
            EXIT_NONFINITE,
        )

    # -- logging -------------------------------------------------------------------------------------
    def metrics_record(self, accum: dict, n: int, images_per_s: float) -> dict:
        record = {"images": self.images, "iteration": self.iteration, "time": time.time()}
        for k, v in accum.items():
            val = (v / n) if not k.startswith("nan/") else v
            record[k] = float(val.item() if torch.is_tensor(val) else val)
        record["images_per_s"] = images_per_s
        record["nan_skipped"] = self.nan_skipped
        for name, opt in self.method.optimizers().items():
            record[f"lr/{name}"] = opt.param_groups[0]["lr"]
        if self.dist.device.type == "cuda":
            record["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return record

    def format_record(self, record: dict) -> str:
        keys = [k for k in record if k.startswith(("loss/", "langevin/drift", "langevin/sigma_delta"))]
        parts = [f"{record['images']:>10,} img"] + [f"{k}={record[k]:.4g}" for k in keys]
        parts.append(f"{record['images_per_s']:.1f} img/s")
        return "  ".join(parts)

    def log(self, message: str, progress=None) -> None:
        if self.dist.is_main:
            (progress.console if progress else self.console).print(message, highlight=False)

    def _progress(self):
        from .progress import rich_bar

        if not (self.recipe.logging.progress and self.dist.is_main and self.console.is_terminal):
            return _NoProgress()
        return rich_bar(self.console)


class _NoProgress:
    """Stand-in when there is no terminal: logging lines are printed instead of a live bar."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False

    def add_task(self, *a, **k):
        return None

    def update(self, *a, **k):
        pass
