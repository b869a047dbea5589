"""Shared test setup: offline, a private cache, few threads, and helpers for tiny recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["EMDCTL_OFFLINE"] = "1"  # never touch the network from tests
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


_FRESH_SEEDS: list[int] = []  # the seeds fresh() drew during the current test


def fresh(seed: int | None = None) -> torch.Generator:
    """A CPU generator: freshly seeded from OS entropy (a new draw every run) unless a seed is given.
    A failing test reports the seeds it drew (to rerun it exactly: fresh(that seed))."""
    g = torch.Generator()
    if seed is None:
        seed = g.seed()
        _FRESH_SEEDS.append(seed)
    else:
        g.manual_seed(seed)
    return g


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and _FRESH_SEEDS:
        report.sections.append(("fresh random inputs", f"seeds drawn by fresh(): {_FRESH_SEEDS}"))


@pytest.fixture(autouse=True)
def _forget_fresh_seeds():
    _FRESH_SEEDS.clear()
    yield


def shared_data_dir() -> Path | None:
    """../shared/data next to the checkout (or $EMDCTL_SHARED_DATA)."""
    env = os.environ.get("EMDCTL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    return None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EMDCTL_CACHE", str(tmp_path_factory.getbasetemp() / "emdctl-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))
    monkeypatch.delenv("EMDCTL_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data (MNIST, CIFAR-10, the MNIST teacher) is not available next to this checkout")
    return d


def make_generator(path: Path, arch: str = "ddpmpp", shape=(3, 16, 16), label_dim: int = 0, attn=(8,)) -> Path:
    """A small image generator with perturbed (non-trivial) weights, saved as a model directory."""
    from emdctl.generator import OneStepGenerator
    from emdctl.networks import build_denoiser, preset_config

    width = 32 if arch == "adm" else 16
    kwargs = dict(model_channels=width, channel_mult=[1, 2], num_blocks=1, attn_resolutions=list(attn), dropout=0.0)
    torch.manual_seed(0)
    den = build_denoiser(preset_config(arch, "edm", shape, label_dim, kwargs))
    for p in den.parameters():
        p.data += 0.05 * torch.randn_like(p)
    OneStepGenerator(den, 2.5).save_pretrained(path, {"kind": "image", "range": [-1.0, 1.0]})
    return path


def tiny_mixture_recipe(**overrides) -> dict:
    """A distillation recipe that runs in seconds on a CPU."""
    r = {
        "kind": "distill",
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "teacher": {
            "kind": "mixture",
            "preset": "ring8-unequal",
            "network": {"hidden": 32, "layers": 2, "emb_dim": 16},
            "fit": {"steps": 30, "batch": 256},
        },
        "generator": {"sigma_init": 2.5},
        "method": {"name": "emd", "langevin": {"steps": 2, "gamma_eps": 0.1}},
        "optim": {"lr_gen": 1e-3, "lr_fake": 1e-3},
        "batch": {"size": 64},
        "duration": 640,
        "ema": {"halflife": 1000},
        "logging": {"every": 320, "grid_every": 640, "grid_size": 16, "progress": False},
        "checkpoint": {"every": 320, "keep": 2},
    }
    for key, value in overrides.items():
        node = r
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return r


@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    """A small class-conditional DDPM++ teacher (16x16) and 40 labelled images as .npz."""
    import numpy as np

    from emdctl.networks import build_denoiser, preset_config
    from emdctl.teachers import save_pretrained_denoiser

    root = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    kw = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    den = build_denoiser(preset_config("ddpmpp", "edm", (3, 16, 16), 3, kw))
    save_pretrained_denoiser(den, root / "teacher")
    g = np.random.default_rng(0)
    np.savez(root / "data.npz", arr_0=g.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8), arr_1=g.integers(0, 3, 40))
    return root
