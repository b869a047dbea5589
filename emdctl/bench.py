"""`emdctl bench`: throughput of the engine, each number beside the eager-fp32 baseline measured in
the same run (as a ratio), with peak GPU memory.

Measured: denoiser forward and forward+backward img/s; one full EMD-K training iteration and its
Langevin E-step alone; one-step sampling img/s. The configured variant applies the precision
policy (bf16 autocast, channels-last, torch.compile, the fused Langevin update). Meaningful on a
GPU; on a CPU it runs with tiny networks (and is tested that way).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels
from .distributed import DistContext, resolve_device
from .errors import UserError
from .networks import build_denoiser, count_parameters, preset_config
from .precision import apply_policy, configure_backends
from .recipe import parse_recipe
from .rng import IterationDraws
from .teachers import Teacher

NETS = {
    "ddpmpp": ("ddpmpp", (3, 32, 32), 10, {"augment_dim": 9}),
    "adm": ("adm", (3, 64, 64), 1000, {}),
    "ncsnpp": ("ncsnpp", (3, 32, 32), 10, {}),
    "tiny": (
        "ddpmpp",
        (3, 16, 16),
        0,
        {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]},
    ),
    "mlp": ("mlp", (2,), 0, {}),
}


SECTIONS = ("forward", "backward", "emd", "langevin", "sample")
# Not in the default set (a minute or more of CPU runs): the CPU thread policy on shared cores.
OPTIONAL_SECTIONS = ("shared-cpu",)


@dataclass
class Variant:
    name: str
    dtype: str
    compile: bool
    channels_last: bool
    fused: bool
    tf32: bool


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable, device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Seconds per call and peak memory (GB) over the timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dt, peak


def _denoiser(net: str, variant: Variant, device, seed=0):
    arch, shape, labels, kw = NETS[net]
    kw = {**kw, "dropout": 0.0} if arch != "mlp" else kw
    torch.manual_seed(seed)
    den = build_denoiser(preset_config(arch, "edm", shape, labels, kw)).to(device)
    apply_policy(den, variant.dtype, variant.channels_last, False)
    return den


def _inputs(den, batch, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((batch, *den.img_shape), device=device, generator=g)
    sigma = torch.exp(torch.randn(batch, device=device, generator=g) * 1.2 - 1.2)
    labels = (
        torch.nn.functional.one_hot(
            torch.randint(den.label_dim, (batch,), device=device, generator=g), den.label_dim
        ).float()
        if den.label_dim
        else None
    )
    return x, sigma, labels


def _emd_method(den, variant: Variant, batch, K, device):
    from .methods import EMD

    state = {k: v.detach().clone() for k, v in den.state_dict().items()}
    teacher = Teacher(
        denoiser=copy.deepcopy(den).eval().requires_grad_(False),
        source="bench",
        student_config=den.config(),
        init_weights=lambda: state,
    )
    recipe = parse_recipe(
        {
            "kind": "distill",
            "name": "bench",
            "device": device.type,
            "teacher": {"kind": "pretrained", "path": "unused"},
            "method": {
                "name": "emd",
                "langevin": {"steps": K, "gamma_eps": 0.1, "fused_update": "on" if variant.fused else "off"},
            },
            "batch": {"size": batch},
            "precision": {"dtype": variant.dtype, "compile": variant.compile, "channels_last": variant.channels_last},
        },
        "bench",
    )
    m = EMD(recipe, teacher, DistContext(device=device))
    m.initialize()
    return m


def run_bench(
    net: str = "tiny",
    batch: int = 8,
    K: int = 8,
    device_name: str = "auto",
    dtype: str = "bf16",
    compile: bool = True,
    channels_last: bool = True,
    fused: bool = True,
    iters: int = 5,
    warmup: int = 2,
    sections=SECTIONS,
    compare_unfused: bool = False,
    shared_images: int = 200_000,
    log=print,
    shared_competitors: int = 1,
) -> dict:
    if net not in NETS:
        raise UserError(f"network {net!r}: allowed values are {', '.join(NETS)}")
    if batch < 1 or iters < 1 or K < 0:
        raise UserError("the batch size and the timed calls must be positive and K non-negative")
    device = resolve_device(device_name)
    on_gpu = device.type == "cuda"
    # The baseline is strict fp32 (TF32 off, as in EDM's fp32 reference); the configured variant
    # allows TF32 for whatever still runs in fp32 when it asks for a lower precision.
    base = Variant("eager fp32", "fp32", False, False, False, False)
    fused = fused and kernels.available(device)
    conf = Variant(
        f"{dtype}{' +compile' if compile and on_gpu else ''}{' +channels_last' if channels_last else ''}"
        f"{' +fused' if fused else ''}",
        dtype,
        compile and on_gpu,
        channels_last and len(NETS[net][1]) == 3,
        fused,
        dtype != "fp32",
    )
    results: dict[str, dict] = {}

    def record(name, unit, per_call, fn_for, configured=conf):
        row = {"unit": unit}
        for tag, variant in (("baseline", base), ("configured", configured)):
            configure_backends(tf32=variant.tf32)
            dt, peak = _timeit(fn_for(variant), device, warmup, iters)
            row[tag] = per_call / dt
            row[f"{tag}_peak_gb"] = peak
        row["ratio"] = row["configured"] / row["baseline"]
        results[name] = row

    def fwd(variant):
        den = _denoiser(net, variant, device).eval()
        fn = torch.compile(den) if variant.compile else den
        x, s, y = _inputs(den, batch, device)

        def call():
            with torch.no_grad():
                fn(x, s, y)

        return call

    def fwd_bwd(variant):
        den = _denoiser(net, variant, device).train()
        fn = torch.compile(den) if variant.compile else den
        x, s, y = _inputs(den, batch, device)

        def call():
            fn(x, s, y).square().mean().backward()

        return call

    def emd_iteration(variant):
        m = _emd_method(_denoiser(net, variant, device), variant, batch, K, device)
        it = iter(range(10**9))
        return lambda: m.train_step(next(it))

    def langevin(variant):
        m = _emd_method(_denoiser(net, variant, device), variant, batch, K, device)
        it = iter(range(10**9))

        def call():
            draws = IterationDraws(0, next(it), device)
            # generator_direction runs the E-step then one generator forward; no backward
            with torch.enable_grad():
                m.generator_direction(draws, slice(0, batch))

        return call

    def sample(variant):
        den = _denoiser(net, variant, device).eval()
        from .generator import OneStepGenerator

        gen = OneStepGenerator(den, 2.5)
        fn = torch.compile(gen) if variant.compile else gen
        z, _, y = _inputs(den, batch, device)

        def call():
            with torch.no_grad():
                out = fn(z, y)
                if len(den.img_shape) == 3:
                    (out * 127.5 + 128).clamp(0, 255).to(torch.uint8)

        return call

    unknown = set(sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        allowed = ", ".join(SECTIONS + OPTIONAL_SECTIONS)
        raise UserError(f"sections: unknown {', '.join(sorted(unknown))}; allowed: {allowed}")
    if "shared-cpu" in sections:
        results.update(run_shared_cpu(shared_images, shared_competitors, log=log))
    if "forward" in sections:
        record("denoiser forward", "img/s", batch, fwd)
    if "backward" in sections:
        record("denoiser forward+backward", "img/s", batch, fwd_bwd)
    # The fused update's own gain, in the same run: the configured variant again with it off.
    unfused = dataclasses.replace(conf, name=conf.name.replace(" +fused", ""), fused=False)
    compare = compare_unfused and conf.fused
    if "emd" in sections:
        record(f"EMD-{K} training iteration", "it/s", 1, emd_iteration)
        if compare:
            record(f"EMD-{K} training iteration, fused update off", "it/s", 1, emd_iteration, unfused)
    if "langevin" in sections:
        record(f"EMD-{K} E-step (Langevin loop) + generator forward", "it/s", 1, langevin)
        if compare:
            record(f"EMD-{K} E-step + generator forward, fused update off", "it/s", 1, langevin, unfused)
    if "sample" in sections:
        record("one-step sampling", "img/s", batch, sample)
    den = _denoiser(net, base, "cpu" if not on_gpu else device)
    info = {
        "net": net,
        "parameters": count_parameters(den),
        "batch": batch,
        "K": K,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "baseline": base.name,
        "configured": conf.name,
        "iters": iters,
        "warmup": warmup,
    }
    return {"info": info, "results": results}


def run_shared_cpu(images: int = 200_000, competitors: int = 1, log=print, repeats: int = 2) -> dict[str, dict]:
    """The default recipe (`emdctl distill`, `images` images) timed end to end in fresh processes,
    with torch's thread defaults (baseline: one spinning OpenMP thread per core) and with emdctl's
    policy (configured: emdctl.threads, passive OpenMP waiting), each on idle cores and beside
    `competitors` CPU-bound torch processes (small matrix products at torch's defaults). Rows in
    img/s of wall time (start to exit, teacher fit loaded from the cache; the fastest of `repeats`
    runs, alternating the two settings); the result files are compared bit for bit."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from .storage import sha256_file

    cores = os.cpu_count() or 1
    # Baseline: the CLI entered without main()'s environment policy, at torch's own thread count.
    baseline = [sys.executable, "-c", "from emdctl.cli import app; app()"]
    configured = [sys.executable, "-m", "emdctl"]
    work = Path(tempfile.mkdtemp(prefix="emdctl-bench-shared-"))

    def distill(cmd, name, threads, duration):
        args = ["distill", "--run-dir", str(work / name), "--set", f"duration={duration}",
                "--set", "logging.progress=false", "--threads", threads]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd + args, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return time.perf_counter() - t0, sha256_file(work / name / "generator" / "model.safetensors")

    distill(configured, "warm-up", "auto", 1024)  # fits (or loads) the teacher's MLP once: cached
    rows: dict[str, dict] = {}
    hashes = set()
    for label, busy in (("idle cores", 0), (f"beside {competitors} CPU-bound process(es)", competitors)):
        # The competitor: another torch process on small matrices at torch's default threads (like a
        # test suite or a second training run), whose OpenMP threads wait for work by spinning.
        hog = "import torch\nx = torch.randn(64, 64)\nwhile True:\n    x = torch.tanh(x @ x)"
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        hogs = [subprocess.Popen([sys.executable, "-c", hog], env=env) for _ in range(busy)]
        try:
            t_base = t_conf = float("inf")
            for r in range(repeats):
                log(f"shared-cpu: {images:,} images, {label}: torch defaults ({cores} threads), run {r + 1}")
                t, h1 = distill(baseline, f"base-{busy}-{r}", str(cores), images)
                t_base = min(t_base, t)
                log(f"shared-cpu: {images:,} images, {label}: emdctl's thread policy, run {r + 1}")
                t, h2 = distill(configured, f"conf-{busy}-{r}", "auto", images)
                t_conf = min(t_conf, t)
                hashes |= {h1, h2}
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        rows[f"default recipe end to end, {label} (torch defaults / emdctl threads)"] = {
            "unit": "img/s",
            "baseline": images / t_base,
            "configured": images / t_conf,
            "ratio": t_base / t_conf,
            "baseline_peak_gb": None,
            "configured_peak_gb": None,
            "baseline_seconds": t_base,
            "configured_seconds": t_conf,
        }
    idle, shared = rows.values()
    slow = {tag: shared[f"{tag}_seconds"] / idle[f"{tag}_seconds"] for tag in ("baseline", "configured")}
    rows["slowdown beside the competitor (wall time beside / idle; lower is better)"] = {
        "unit": "x", **slow, "ratio": slow["configured"] / slow["baseline"],
        "baseline_peak_gb": None, "configured_peak_gb": None,
    }  # fmt: skip
    if len(hashes) != 1:
        raise UserError("shared-cpu: the thread settings changed the trained weights; please report this")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return rows
