"""No lost work and no surprises: kills, signals, NaN, corrupt files, full disks, hostile inputs."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emdctl import storage
from emdctl.checkpoint import CheckpointManager, load_checkpoint
from emdctl.commands.distill import run_recipe
from emdctl.errors import TrainingStopped, UserError
from emdctl.recipe import parse_recipe
from emdctl.trainer import EXIT_NONFINITE

from .conftest import REPO, tiny_mixture_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def long_recipe(**kw):
    # 200 iterations with a checkpoint every 10: long enough to be killed in the middle (the teacher's
    # fit is loaded from the cache, so a run starts training at once).
    return tiny_mixture_recipe(
        **{
            "duration": 12800,
            "checkpoint.every": 640,
            "checkpoint.keep": 30,
            "logging.every": 640,
            "logging.grid_every": 0,
            "method.langevin.gamma_z": 0.02,
            # the learning rates fall from 1280 images on: the kills below resume inside the decay
            "optim.decay": {"start": 1280, "final": 0.1},
            **kw,
        }
    )


def cmd(recipe_file, run_dir):
    return [sys.executable, "-m", "emdctl", "distill", str(recipe_file), "--run-dir", str(run_dir)]


def final_state(run_dir):
    tensors, meta = CheckpointManager(run_dir).load()
    return {k: v for k, v in tensors.items() if k.startswith(("net.", "optim."))}, meta


def wait_for_checkpoint(run_dir, min_images, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            entries = CheckpointManager(run_dir).entries()
        except UserError:
            entries = []
        if entries and entries[-1]["images"] >= min_images:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before reaching {min_images} images: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    f = tmp / "r.yaml"
    f.write_text(yaml.safe_dump(long_recipe()))
    res = subprocess.run(cmd(f, tmp / "run"), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return f, final_state(tmp / "run")


def assert_same_state(a, b):
    assert a[1]["images"] == b[1]["images"] and a[1]["iteration"] == b[1]["iteration"]
    assert set(a[0]) == set(b[0])
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), f"{k} differs"


@pytest.mark.slow
def test_sigkill_then_rerun_continues_bit_for_bit(tmp_path, reference_run):
    f, ref = reference_run
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(f, run), env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for_checkpoint(run, 1280, proc)
    time.sleep(0.1)  # somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert CheckpointManager(run).entries()[-1]["images"] < 12800  # really killed mid-way
    res = subprocess.run(cmd(f, run), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    assert_same_state(final_state(run), ref)
    # metrics.jsonl has no duplicated intervals after the resume
    images = [json.loads(x)["images"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert images == sorted(set(images))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.slow
def test_signal_checkpoints_then_resumes_bit_for_bit(tmp_path, reference_run, sig, code):
    f, ref = reference_run
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(f, run), env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for_checkpoint(run, 640, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "re-run the same command to resume" in err
    stopped_at = CheckpointManager(run).entries()[-1]["images"]
    assert 640 <= stopped_at < 12800
    res = subprocess.run(cmd(f, run), env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert_same_state(final_state(run), ref)


def test_signal_during_a_stalled_first_iteration_stops_at_once(tmp_path, monkeypatch):
    """A signal while the first iteration after a checkpoint is still running (on a GPU: inside
    torch.compile, minutes) stops the run at once; the checkpoint on disk holds everything and the
    re-run reaches the same final state as an uninterrupted run."""
    from emdctl.methods.distill import DistillationMethod

    r = parse_recipe(tiny_mixture_recipe(), "r")
    run_recipe(r, run_dir=tmp_path / "reference")
    original = DistillationMethod.train_step
    stalled_at = []

    def stalled(self, iteration):
        if iteration == 5 and not stalled_at:  # the first iteration after the 320-image checkpoint
            stalled_at.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # a step that would not finish in time
        return original(self, iteration)

    monkeypatch.setattr(DistillationMethod, "train_step", stalled)
    with pytest.raises(TrainingStopped) as e:
        run_recipe(r, run_dir=tmp_path / "run")
    assert time.perf_counter() - stalled_at[0] < 30
    assert e.value.exit_code == 143 and "before another iteration finished" in e.value.message
    assert CheckpointManager(tmp_path / "run").entries()[-1]["images"] == 320
    monkeypatch.setattr(DistillationMethod, "train_step", original)
    run_recipe(r, run_dir=tmp_path / "run")
    assert_same_state(final_state(tmp_path / "run"), final_state(tmp_path / "reference"))


def _poison_from(monkeypatch, iteration, until=None):
    """Make the generator's direction NaN from the given iteration on (up to `until`, exclusive)."""
    from emdctl.methods.distill import DistillationMethod

    original = DistillationMethod.generator_gradients

    def poisoned(self, draws):
        if draws.iteration >= iteration and (until is None or draws.iteration < until):
            real = self.generator_direction

            def bad(d, rows):
                x0, dd, w, stt = real(d, rows)
                return x0, dd * float("nan"), w, stt

            self.generator_direction = bad
            try:
                return original(self, draws)
            finally:
                del self.generator_direction
        return original(self, draws)

    monkeypatch.setattr(DistillationMethod, "generator_gradients", poisoned)


def test_nan_stops_with_last_good_checkpoint_and_diagnostics(tmp_path, monkeypatch):
    _poison_from(monkeypatch, 7)
    r = parse_recipe(long_recipe(), "r")
    with pytest.raises(TrainingStopped) as e:
        run_recipe(r, run_dir=tmp_path / "run")
    assert e.value.exit_code == EXIT_NONFINITE
    msg = e.value.message
    assert "iteration 7" in msg and "loss/gen is nan" in msg and "ckpt-000000000000.safetensors" in msg
    diag = json.loads((tmp_path / "run" / "nonfinite-000000007.json").read_text())
    assert diag["quantity"] == "loss/gen" and diag["diagnostics"]["direction"]["finite_fraction"] == 0.0
    # the last good state is kept and still loads; nothing after the NaN was written
    tensors, meta = CheckpointManager(tmp_path / "run").load()
    assert meta["images"] <= 7 * 64 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_nan_skip_policy_counts_and_reports(tmp_path, monkeypatch):
    _poison_from(monkeypatch, 55, until=60)
    r = parse_recipe(long_recipe(**{"nan.policy": "skip", "nan.max_skips": 10}), "r")
    run, summary = run_recipe(r, run_dir=tmp_path / "run")
    assert summary["nan_skipped"] == 5
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["nan_skipped"] == 5  # the running count, in every later record
    assert [r["nan/skipped"] for r in records if "nan/skipped" in r] == [5]  # the interval they fell in
    # more consecutive skips than allowed: the run stops
    _poison_from(monkeypatch, 0)
    r = parse_recipe(long_recipe(**{"nan.policy": "skip", "nan.max_skips": 3}), "r")
    with pytest.raises(TrainingStopped, match="after 3 consecutive skipped steps"):
        run_recipe(r, run_dir=tmp_path / "run2")


def test_corrupt_checkpoint_is_named_and_not_loaded(tmp_path):
    """The newest checkpoint damaged: the run resumes from the one before, which verifies, and sets
    the damaged file aside; with none left that verifies, it stops with one line."""
    r = parse_recipe(tiny_mixture_recipe(), "r")
    run_recipe(r, run_dir=tmp_path / "run")
    mgr = CheckpointManager(tmp_path / "run")
    latest = mgr.latest()
    data = bytearray(latest.read_bytes())
    data[-10] ^= 0xFF
    latest.write_bytes(bytes(data))
    run_recipe(r, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "damaged" / latest.name).read_bytes() == bytes(data)
    assert CheckpointManager(tmp_path / "run").latest().name == latest.name  # re-made by the resumed run
    for f in (tmp_path / "run" / "checkpoints").glob("ckpt-*.safetensors"):
        f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(UserError) as e:
        run_recipe(r, run_dir=tmp_path / "run")
    assert "checksum mismatch" in e.value.message and "no older checkpoint verifies either" in e.value.message
    latest.write_bytes(bytes(data[:100]))  # truncated and unlisted: a clear error too
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(latest, entries=[])


def test_checkpoint_from_another_architecture(tmp_path):
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=tmp_path / "run")
    wider = parse_recipe(tiny_mixture_recipe(**{"teacher.network.hidden": 48, "duration": 1280}), "r")
    with pytest.raises(UserError, match="do not fit this architecture"):
        run_recipe(wider, run_dir=tmp_path / "run", resume=True)


def test_force_moves_the_old_run_aside(tmp_path):
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=tmp_path / "run")
    run_recipe(parse_recipe(tiny_mixture_recipe(**{"optim.lr_gen": 5e-4}), "r"), run_dir=tmp_path / "run", force=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "manifest.json").is_file()


def test_resume_extends_a_finished_run(tmp_path):
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=tmp_path / "run")
    longer = parse_recipe(tiny_mixture_recipe(duration=1280), "r")
    _, summary = run_recipe(longer, run_dir=tmp_path / "run", resume=True)
    assert summary["images"] == 1280
    assert list((tmp_path / "run").glob("recipe.*.yaml"))  # the previous recipe is kept


def test_learning_rates_follow_the_decay_and_a_resumed_recipe(tmp_path):
    from emdctl.methods.base import decay_factor

    decay = {"start": 192, "final": 0.2, "shape": "cosine"}
    r = parse_recipe(tiny_mixture_recipe(**{"optim.decay": decay, "logging.every": 64}), "r")
    run_recipe(r, run_dir=tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {e["images"]: (e["lr/generator"], e["lr/fake"]) for e in records if "lr/generator" in e}
    assert len(logged) == 10
    for images, (lr_gen, lr_fake) in logged.items():
        # the logged rate is the one the last step (which started at images - 64) used; written out:
        u = min(max((images - 64 - 192) / (640 - 192), 0.0), 1.0)
        f = 1.0 - 0.8 * 0.5 * (1.0 - math.cos(math.pi * u))
        assert lr_gen == pytest.approx(1e-3 * f, rel=1e-12) and lr_fake == pytest.approx(1e-3 * f, rel=1e-12)
    assert logged[640][0] < 0.25e-3  # it really fell
    # resuming a finished run with a new recipe trains with the new recipe's rates (not the checkpoint's)
    longer = parse_recipe(tiny_mixture_recipe(**{"duration": 768, "optim.lr_gen": 5e-4, "logging.every": 64}), "r")
    run_recipe(longer, run_dir=tmp_path / "run", resume=True)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["images"] == 768 and last["lr/generator"] == 5e-4 and last["lr/fake"] == 1e-3
    # ... and with its other optimizer settings
    betas = parse_recipe(tiny_mixture_recipe(**{"duration": 832, "optim.betas_gen": [0.5, 0.9]}), "r")
    run_recipe(betas, run_dir=tmp_path / "run", resume=True)
    groups = CheckpointManager(tmp_path / "run").load()[1]["optimizers"]["generator"]["param_groups"]
    assert list(groups[0]["betas"]) == [0.5, 0.9]
    # the linear shape, and fresh random points against the formula
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    for _ in range(20):
        start, final = int(torch.randint(0, 1000, (), generator=gen)), float(torch.rand((), generator=gen)) * 0.9 + 0.05
        duration, images = start + 1000, int(torch.randint(0, 3000, (), generator=gen))
        d = parse_recipe(
            tiny_mixture_recipe(
                **{"duration": duration, "optim.decay": {"start": start, "final": final, "shape": "linear"}}
            ),
            "r",
        )
        u = min(max((images - start) / 1000, 0.0), 1.0)
        assert decay_factor(d.optim.decay, images, duration) == pytest.approx(1 - (1 - final) * u, rel=1e-12)


def test_disk_full_leaves_no_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.safetensors"
    storage.atomic_save_safetensors(target, {"a": torch.ones(3)}, {})
    before = target.read_bytes()

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "save_file", full)
    with pytest.raises(OSError):
        storage.atomic_save_safetensors(target, {"a": torch.zeros(1000)}, {})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_two_processes_cannot_share_a_run_directory(tmp_path):
    from emdctl.runs import RunDir

    a, b = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    a.lock()
    try:
        with pytest.raises(UserError, match="another emdctl process"):
            b.lock()
    finally:
        a.unlock()


def test_teacher_resolution_mismatch(tmp_path, shared_data):
    data = tiny_mixture_recipe()
    data["teacher"] = {
        "kind": "ddpm-pulfer",
        "path": str(shared_data / "teachers/ddpm_mnist_pulfer_myunet.pt"),
        "resolution": 32,
    }
    with pytest.raises(UserError, match="teacher.resolution: the recipe expects 32x32"):
        run_recipe(parse_recipe(data, "r"), run_dir=tmp_path / "run")


@pytest.mark.parametrize("case", ["empty", "non-square", "not-images"])
def test_bad_datasets(tmp_path, case):
    from PIL import Image

    from emdctl.data import open_dataset

    d = tmp_path / "data"
    d.mkdir()
    if case == "non-square":
        Image.new("RGB", (8, 6)).save(d / "a.png")
    if case == "not-images":
        (d / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError):
        ds = open_dataset(d)
        ds[0]


# --------------------------------------------------------------------------------------------
# Fuzzing: no input crashes with a traceback; every rejection is a UserError.

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
trees = st.recursive(
    scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
    max_leaves=10,
)
KEYS = [
    "teacher",
    "method",
    "optim",
    "batch",
    "duration",
    "ema",
    "precision",
    "logging",
    "checkpoint",
    "nan",
    "generator",
    "fake_score",
    "seed",
    "device",
    "name",
    "kind",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), trees, max_size=6), st.sampled_from([None, "distill", "teacher-train"]))
def test_fuzz_recipe_loader(fields, kind):
    data = tiny_mixture_recipe()
    data.update(fields)
    if kind:
        data["kind"] = kind
    try:
        parse_recipe(data, "fuzz.yaml")
    except UserError as e:  # one line per problem, each naming the file and a field
        assert e.message and all(line.startswith("fuzz.yaml: ") for line in e.message.splitlines())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_recipe_yaml_text(text):
    import tempfile
    from pathlib import Path

    from emdctl.recipe import load_recipe

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(text)
        try:
            load_recipe(p)
        except UserError:
            pass


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    mgr = CheckpointManager(tmp, keep=2)
    path = mgr.save(
        {"net.generator.w": torch.randn(4, 4), "optim.gen.0.exp_avg": torch.zeros(4)},
        {"images": 64, "iteration": 1, "kind": "distill"},
    )
    return path.read_bytes()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_checkpoint_reader(a_checkpoint, data):
    import tempfile
    from pathlib import Path

    raw = bytearray(a_checkpoint)
    mode = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=300)))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "ckpt-000000000064.safetensors"
        p.write_bytes(bytes(raw))
        try:
            load_checkpoint(p, entries=[])
        except UserError:
            pass
