"""Nothing lost, nothing mixed, no traceback: concurrency, faults and hostile input (issue "Data
integrity under concurrency, faults and hostile input")."""

from __future__ import annotations

import io
import json
import os
import struct
import time

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from emdctl.checkpoint import CheckpointManager
from emdctl.cli import app
from emdctl.commands.distill import run_recipe
from emdctl.errors import TrainingStopped, UserError
from emdctl.recipe import parse_recipe
from emdctl.storage import DirectoryLock
from emdctl.trainer import EXIT_NONFINITE

from .conftest import make_generator, tiny_mixture_recipe

runner = CliRunner()
QUIET = Console(file=io.StringIO())


def invoke(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def one_line_error(res, *needles):
    """Exit status 2 and one `error:` line (progress lines may come before it), no traceback."""
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def write_recipe(path, **overrides):
    path.write_text(yaml.safe_dump(tiny_mixture_recipe(**overrides)))
    return path


def tensors_of(run):
    return load_file(run / "generator" / "model.safetensors")


# -- 1. a refused command changes nothing ---------------------------------------------------------


def test_force_and_resume_on_a_locked_run_change_nothing(tmp_path):
    f = write_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    assert invoke(["distill", f, "--run-dir", run]).exit_code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = write_recipe(tmp_path / "other.yaml", seed=1)
    with DirectoryLock(run, "run directory"):  # another process training in it
        for flag in ("--force", "--resume"):
            res = invoke(["distill", other, "--run-dir", run, flag])
            one_line_error(res, f"pid {os.getpid()}", "another emdctl process")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert invoke(["distill", f, "--run-dir", run]).exit_code == 0  # the original command still works


# -- 2. sample folders never mix -----------------------------------------------------------------


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    root = tmp_path_factory.mktemp("gens")
    from emdctl.generator import load_generator

    a = make_generator(root / "a", shape=(1, 8, 8), attn=())
    gen, cfg = load_generator(a)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01)
    gen.save_pretrained(root / "b", cfg["data"])  # another generator of the same shape
    return a, root / "b"


def rows(out):
    return np.load(out / "samples.npz")["arr_0"]


def test_a_sample_folder_belongs_to_one_source_and_setting(tmp_path, generators):
    a, b = generators
    out = tmp_path / "s"
    assert invoke(["sample", a, "--n", 1500, "--out", out, "--format", "npz", "--batch", 256]).exit_code == 0
    full = rows(out)
    assert len(full) == 1500
    one_line_error(invoke(["sample", b, "--n", 1500, "--out", out, "--format", "npz"]), "weights", "--force")
    one_line_error(invoke(["sample", a, "--n", 1500, "--out", out, "--format", "npz", "--steps", 2]), "steps")
    one_line_error(invoke(["sample", a, "--n", 1400, "--out", out, "--format", "npz"]), "seeds")
    with DirectoryLock(out, "sample folder"):
        one_line_error(invoke(["sample", a, "--n", 1500, "--out", out, "--format", "npz"]), f"pid {os.getpid()}")
    assert np.array_equal(rows(out), full)
    res = invoke(["sample", b, "--n", 1500, "--out", out, "--format", "npz", "--force"])
    assert res.exit_code == 0 and len(rows(out)) == 1500 and not np.array_equal(rows(out), full)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("s.replaced-")]
    assert len(aside) == 1 and np.array_equal(rows(aside[0]), full)


def test_a_kill_between_a_block_and_its_record_never_duplicates_rows(tmp_path, generators):
    a, _ = generators
    out = tmp_path / "s"
    assert invoke(["sample", a, "--n", 2100, "--out", out, "--format", "npz", "--batch", 256]).exit_code == 0
    full = rows(out)
    (out / ".shards" / "block-000000001000.done").unlink()  # killed after the npz, before its record
    (out / "samples.npz").unlink()
    assert invoke(["sample", a, "--n", 2100, "--out", out, "--format", "npz", "--batch", 100]).exit_code == 0
    assert np.array_equal(rows(out), full)


def test_any_number_of_samples_in_bounded_memory(tmp_path, generators):
    a, _ = generators
    res = invoke(["sample", a, "--seeds", "0-999999999999", "--out", tmp_path / "s", "--format", "npz"])
    one_line_error(res, "GiB", "free")
    from emdctl.seeds import parse_seeds

    seeds = parse_seeds("5-999999999999,3")
    assert len(seeds) == 999999999996 and seeds[-1] == 3 and seeds[999999999994] == 999999999999
    assert seeds[10:13] == [15, 16, 17] and parse_seeds("0-2").digest() == parse_seeds("0,1,2").digest()


# -- 3. never a non-finite checkpoint; diverged generators are refused ------------------------------


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Weights that pass the step's check yet make every sample overflow (finite, 1e30) right
    before a checkpoint: the checkpoint is refused and the run stops, the earlier ones intact."""
    from emdctl.methods import base

    original = base.Method.optimizer_step
    count = {"gen": 0}

    def blow_up(self, name, opt, params, clip, loss):
        out = original(self, name, opt, params, clip, loss)
        if name == "gen":
            count["gen"] += 1
            if count["gen"] == 5:  # iteration 4: the next checkpoint is at 320 images
                with torch.no_grad():
                    for p in self.generator.parameters():
                        p.fill_(1e30)
        return out

    monkeypatch.setattr(base.Method, "optimizer_step", blow_up)
    with pytest.raises(TrainingStopped) as e:
        run_recipe(parse_recipe(tiny_mixture_recipe(duration=1280), "r"), run_dir=tmp_path / "run", console=QUIET)
    assert e.value.exit_code == EXIT_NONFINITE and "not checkpointed" in e.value.message
    assert "ckpt-000000000000.safetensors" in e.value.message
    files = list((tmp_path / "run" / "checkpoints").glob("ckpt-*.safetensors"))
    assert [f.name for f in files] == ["ckpt-000000000000.safetensors"]
    assert all(torch.isfinite(v).all() for v in load_file(files[0]).values() if v.is_floating_point())


def test_a_step_to_non_finite_weights_stops_even_with_skip(tmp_path, monkeypatch):
    from emdctl.methods import base

    original = base.Method.optimizer_step

    def after_step(self, name, opt, params, clip, loss):
        params = [p for p in params if p.grad is not None]
        real_step = opt.step

        def step(*a, **k):
            real_step(*a, **k)
            with torch.no_grad():
                params[0].fill_(float("nan"))

        opt.step = step
        try:
            return original(self, name, opt, params, clip, loss)
        finally:
            del opt.step

    monkeypatch.setattr(base.Method, "optimizer_step", after_step)
    r = parse_recipe(tiny_mixture_recipe(**{"nan.policy": "skip"}), "r")
    with pytest.raises(TrainingStopped, match=r"weights/\w+ is nan") as e:
        run_recipe(r, run_dir=tmp_path / "run", console=QUIET)
    assert e.value.exit_code == EXIT_NONFINITE


def test_diverged_generators_are_refused_by_sample_export_and_modes(tmp_path):
    from emdctl.generator import load_generator
    from emdctl.storage import module_state, save_model_dir

    run = tmp_path / "run"
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=run, console=QUIET)
    gen, cfg = load_generator(run / "generator")
    state = module_state(gen)
    huge = {k: (v * 1e30 if v.is_floating_point() else v) for k, v in state.items()}  # finite, overflowing
    save_model_dir(tmp_path / "huge", huge, {k: v for k, v in cfg.items() if k not in ("format", "weights_sha256")})
    first = next(k for k, v in state.items() if v.is_floating_point())
    nan = {**state, first: torch.full_like(state[first], float("nan"))}
    save_model_dir(tmp_path / "nan", nan, {k: v for k, v in cfg.items() if k not in ("format", "weights_sha256")})
    one_line_error(invoke(["sample", tmp_path / "nan", "--n", 10, "--out", tmp_path / "a"]), "NaN/inf")
    one_line_error(invoke(["sample", tmp_path / "huge", "--n", 10, "--out", tmp_path / "b"]), "non-finite samples")
    one_line_error(invoke(["export", tmp_path / "huge", "--out", tmp_path / "e"]), "non-finite samples")
    one_line_error(invoke(["evaluate", "modes", tmp_path / "huge", "--n", 100]), "non-finite samples")


# -- 4. a damaged newest checkpoint, a deleted manifest ---------------------------------------------


def test_resume_falls_back_past_a_damaged_checkpoint_bit_for_bit(tmp_path):
    r = parse_recipe(tiny_mixture_recipe(duration=960, **{"checkpoint.keep": 3}), "r")
    run_recipe(r, run_dir=tmp_path / "reference", console=QUIET)
    partial = parse_recipe(tiny_mixture_recipe(duration=960, **{"checkpoint.keep": 3}), "r")
    run_recipe(partial, run_dir=tmp_path / "run", console=QUIET)
    mgr = CheckpointManager(tmp_path / "run")
    newest = mgr.latest()
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    (tmp_path / "run" / "summary.json").unlink()
    buf = io.StringIO()
    longer = parse_recipe(tiny_mixture_recipe(duration=960, **{"checkpoint.keep": 3}), "r")
    run_recipe(longer, run_dir=tmp_path / "run", console=Console(file=buf, width=300), resume=True)
    assert f"{newest.name} (images 960) does not verify" in buf.getvalue()
    assert (tmp_path / "run" / "checkpoints" / "damaged" / newest.name).is_file()
    ref, got = tensors_of(tmp_path / "reference"), tensors_of(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_deleted_manifest_is_rebuilt_not_restarted(tmp_path):
    run = tmp_path / "run"
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=run, console=QUIET)
    files = sorted((run / "checkpoints").glob("ckpt-*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    (run / "checkpoints" / "manifest.json").unlink()
    buf = io.StringIO()
    _, summary = run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=run, console=Console(file=buf))
    assert "was missing; rebuilt from 2 checkpoint file(s)" in buf.getvalue() and "already trained" in buf.getvalue()
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing overwritten
    entries = json.loads((run / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert [e["file"] for e in entries] == [f.name for f in files]


def test_a_manifest_entry_without_a_file_is_one_line(tmp_path):
    run = tmp_path / "run"
    run_recipe(parse_recipe(tiny_mixture_recipe(), "r"), run_dir=run, console=QUIET)
    m = run / "checkpoints" / "manifest.json"
    data = json.loads(m.read_text())
    del data["checkpoints"][-1]["file"]
    m.write_text(json.dumps(data))
    one_line_error(invoke(["sample", run, "--no-ema", "--n", 4, "--out", tmp_path / "s"]), "lacks a valid file")


# -- 5. a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_the_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from emdctl import storage

    f = write_recipe(tmp_path / "r.yaml", duration=960)
    assert invoke(["distill", f, "--run-dir", tmp_path / "reference"]).exit_code == 0
    real = storage.save_file

    def full(tensors, path, metadata=None):
        if "ckpt-000000000640" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(storage, "save_file", full)
    res = invoke(["distill", f, "--run-dir", tmp_path / "run"])
    one_line_error(res, "no space left on the device in", "checkpoints", "intact")
    monkeypatch.setattr(storage, "save_file", real)
    assert invoke(["distill", f, "--run-dir", tmp_path / "run"]).exit_code == 0
    ref, got = tensors_of(tmp_path / "reference"), tensors_of(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# -- 6. values that validate must run --------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("optim.lr_gen", 1e308),
        ("optim.lr_fake", float("inf")),
        ("batch.size", 10**12),
        ("teacher.network.hidden", 10**9),
        ("logging.grid_size", 10**9),
        ("method.langevin.steps", 10**12),
        ("duration", 10**20),
    ],
)
def test_bounds_in_the_schema(field, value):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        parse_recipe(tiny_mixture_recipe(**{field: value}), "r")


def test_a_config_json_that_does_not_fit_its_weights_is_refused_before_allocating(tmp_path):
    gen = make_generator(tmp_path / "g", shape=(1, 8, 8), attn=())
    cfg = json.loads((gen / "config.json").read_text())
    cfg["denoiser"]["arch_kwargs"]["model_channels"] = 10**6
    (gen / "config.json").write_text(json.dumps(cfg))
    t0 = time.time()
    one_line_error(invoke(["sample", gen, "--n", 2, "--out", tmp_path / "s"]), "do not belong together")
    assert time.time() - t0 < 30


def test_the_memory_estimate_refuses_what_cannot_fit():
    from emdctl.memory import check_fits

    config = {"precond": "edm", "precond_kwargs": {"sigma_data": 0.5}, "img_shape": [2], "label_dim": 0,
              "arch": "mlp", "arch_kwargs": {"hidden": 65536, "layers": 64, "emb_dim": 64}}  # fmt: skip
    with pytest.raises(UserError, match="need about .* GB, and the host has"):
        check_fits(config, 9, 256, "fp32", False, "cpu", "network")


# -- 7. the recipe reader --------------------------------------------------------------------------


def laughs(levels: int = 8) -> str:
    """A billion-laughs YAML flow mapping: 9 ** levels values from a few hundred characters."""
    parts = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    parts += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a: " + "[" * 100000 + "]" * 100000, "nested too deeply"),
        ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "nested too deeply"),
        ("seed: " + "9" * 5000, "cannot be read"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("generator: {arch_overrides: " + laughs() + "}", "expands to more than"),
        ("a: &x [*x]\n", "contains it"),
    ],
)
def test_hostile_recipes_are_one_line(tmp_path, text, needle):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    t0 = time.time()
    one_line_error(invoke(["recipe", "validate", p]), needle)
    assert time.time() - t0 < 20


def test_special_files_and_set_bombs_are_refused(tmp_path):
    one_line_error(invoke(["recipe", "validate", "/dev/zero"]), "not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(invoke(["recipe", "validate", fifo]), "not a regular file")
    t0 = time.time()
    res = invoke(["recipe", "show", "--set", f"generator.arch_overrides={laughs()}"])
    one_line_error(res, "expands to more than")
    assert time.time() - t0 < 20


# -- 8. output paths and model files ---------------------------------------------------------------


def test_output_paths_and_sparse_model_files(tmp_path, generators):
    a, _ = generators
    (tmp_path / "file").write_text("x")
    one_line_error(invoke(["sample", a, "--n", 2, "--out", tmp_path / "file"]), "not a directory")
    one_line_error(invoke(["export", a, "--out", tmp_path / "file"]), str(tmp_path / "file"))
    one_line_error(invoke(["export", a, "--out", "/proc/emdctl-test/x"]), "/proc/emdctl-test")
    one_line_error(invoke(["sample", a, "--n", -1, "--out", tmp_path / "s"]), "--n -1: give at least 1 image")
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 36], "data_offsets": [0, 1 << 38]}}).encode()
    with open(sparse / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 38))  # claims 256 GiB, holds nothing
    (sparse / "config.json").write_text(json.dumps({"format": "emdctl-model", "kind": "generator", "denoiser": {}}))
    t0 = time.time()
    one_line_error(invoke(["sample", sparse, "--n", 2, "--out", tmp_path / "t"]), "GiB")
    assert time.time() - t0 < 30


# -- 9. the smaller ones -----------------------------------------------------------------------------


def test_stale_export_staging_is_removed(tmp_path, generators):
    a, _ = generators
    stale = tmp_path / ".export.staging-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert invoke(["export", a, "--out", tmp_path / "export"]).exit_code == 0
    assert not stale.exists() and (tmp_path / "export" / "config.json").is_file()


def test_bad_npz_and_pickled_teacher_files_get_our_one_line(tmp_path):
    from emdctl.data import open_dataset
    from emdctl.teachers import load_ddpm_pulfer

    (tmp_path / "r.npz").write_bytes(os.urandom(300))
    with pytest.raises(UserError, match="not an npz file") as e:
        open_dataset(tmp_path / "r.npz")
    assert "allow_pickle" not in e.value.message
    torch.save({"network.x": torch.zeros(2), "extra": ValueError("an arbitrary object")}, tmp_path / "t.pt")
    with pytest.raises(UserError) as e:
        load_ddpm_pulfer(tmp_path / "t.pt")
    assert "\n" not in e.value.message and "state_dict of tensors" in e.value.message


def test_a_second_ctrl_c_says_what_was_kept(tmp_path):
    import signal

    from emdctl.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t._stop_signal = signal.SIGINT
    t.images = 1234
    t.ckpt = CheckpointManager(tmp_path)
    t.dist = type("D", (), {"is_main": True})()
    with pytest.raises(TrainingStopped, match="second SIGINT at 1,234 images, without a new checkpoint") as e:
        t._on_signal(signal.SIGINT, None)
    assert e.value.exit_code == 130


# -- the property: no reader raises anything but the tool's own error ----------------------------------


@settings(
    max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(max_size=400),
    raw=st.binary(max_size=400),
    which=st.sampled_from(["config", "weights", "npz", "png", "manifest"]),
)
def test_readers_raise_only_user_errors(tmp_path_factory, text, raw, which):
    from emdctl.data import open_dataset
    from emdctl.recipe import parse_yaml
    from emdctl.sampling import open_generator

    try:
        parse_yaml(text, "fuzz")
    except UserError:
        pass
    d = tmp_path_factory.mktemp("fuzz")
    if which in ("config", "weights"):
        model = {"format": "emdctl-model", "kind": "generator", "denoiser": {}}
        (d / "config.json").write_text(text if which == "config" else json.dumps(model))
        (d / "model.safetensors").write_bytes(raw)
        target = lambda: open_generator(d)  # noqa: E731
    elif which == "manifest":
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "manifest.json").write_text(text)
        target = lambda: open_generator(d, use_ema=False)  # noqa: E731
    else:
        (d / "000000").mkdir()
        (d / "000000" / ("000000.png" if which == "png" else "x.png")).write_bytes(raw)
        (d / "s.npz").write_bytes(raw)
        target = lambda: open_dataset(d / "s.npz" if which == "npz" else d)  # noqa: E731
    try:
        target()
    except UserError as e:  # one line, naming what it is about
        assert e.message and "\n" not in e.message and (str(d) in e.message or "fuzz" in e.message)
