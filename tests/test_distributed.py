"""torchrun + DDP on the CPU (gloo): two processes give the single-process gradients and results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from emdctl.checkpoint import CheckpointManager

from .conftest import REPO, tiny_mixture_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(world: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def launch(args: list[str], nproc: int, cwd=None) -> None:
    """`python ARGS` in one process, or under torchrun with `nproc` processes (gloo on the CPU)."""
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=cwd, env=env_for(nproc), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def run_distill(tmp_path, recipe_file, run_dir, nproc):
    launch(["-m", "emdctl", "distill", str(recipe_file), "--run-dir", str(run_dir)], nproc, cwd=tmp_path)
    return CheckpointManager(run_dir).load()


def assert_two_processes_equal_one(tmp_path, recipe: dict, iterations: int) -> dict:
    """Run RECIPE in one process and in two (gloo): the same weights and optimizer states after
    `iterations`. Returns the single-process checkpoint's tensors."""
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe))
    t1, m1 = run_distill(tmp_path, f, tmp_path / "one", 1)
    t2, m2 = run_distill(tmp_path, f, tmp_path / "two", 2)
    assert m1["iteration"] == m2["iteration"] == iterations and m2["world_size"] == 2
    for key in t1:
        if key.startswith(("net.", "optim.")):
            assert torch.allclose(t1[key].float(), t2[key].float(), atol=2e-5, rtol=1e-4), key
    return t1


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    recipe = tiny_mixture_recipe(
        **{"batch.size": 32, "duration": 320, "checkpoint.every": 10_000, "method.langevin.gamma_z": 0.02}
    )
    assert_two_processes_equal_one(tmp_path, recipe, iterations=10)


@pytest.mark.slow
def test_gdd_two_gloo_processes_equal_one(tmp_path):
    """GDD's discriminator is not DDP-wrapped (R1's double backward): its hand-averaged gradients,
    R1 steps included, must still give the single-process run."""
    recipe = tiny_mixture_recipe(
        **{
            "method": {"name": "gdd", "r1_gamma": 0.1, "r1_every": 2},
            "batch.size": 32,
            "batch.micro": 8,
            "duration": 320,
            "checkpoint.every": 10_000,
        }  # fmt: skip
    )
    t1 = assert_two_processes_equal_one(tmp_path, recipe, iterations=10)
    assert any(k.startswith("net.discriminator.") for k in t1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sid", "sida", "dmd2"])
def test_sid_sida_dmd2_two_gloo_processes_equal_one(tmp_path, name):
    """Their gradients through the networks' inputs (SiD), the critic's shared forward of real and
    generated rows (SiDA, DMD2) and DMD2's two time scales, over two ranks and micro-batches."""
    recipe = tiny_mixture_recipe(
        **{
            "method": {"name": name},
            "fake_score.steps_per_iteration": 2,
            "batch.size": 32,
            "batch.micro": 8,
            "duration": 160,
            "checkpoint.every": 10_000,
        }  # fmt: skip
    )
    assert_two_processes_equal_one(tmp_path, recipe, iterations=5)


GRADIENT_SCRIPT = textwrap.dedent(
    r"""
    import gc, sys, torch, yaml
    from emdctl import distributed
    from emdctl.methods import EMD
    from emdctl.recipe import parse_recipe
    from emdctl.rng import IterationDraws
    from emdctl.teachers import load_teacher

    def generator_gradient(recipe, dist):
        m = EMD(recipe, load_teacher(recipe.teacher, seed=0), dist)
        m.initialize()
        m.opt_gen.zero_grad(set_to_none=True)
        m.generator_gradients(IterationDraws(recipe.seed, 0, dist.device))
        return torch.cat([p.grad.flatten() for p in m.generator.parameters()])

    recipe = parse_recipe(yaml.safe_load(open(sys.argv[1])), "r")
    dist = distributed.init("cpu")
    # The DDP-wrapped networks hold the process group: free them before it is torn down, not at
    # interpreter exit (as a global they were, and one gloo rank sometimes aborted at exit with
    # 'terminate called without an active exception', after the gradient was written).
    g = generator_gradient(recipe, dist)
    gc.collect()
    if dist.rank == 0:
        torch.save(g, sys.argv[2])
    distributed.shutdown(synchronize=True)
    """
)


@pytest.mark.slow
def test_gradients_equal_across_world_sizes_and_micro_batches(tmp_path):
    script = tmp_path / "grad.py"
    script.write_text(GRADIENT_SCRIPT)
    grads = {}
    for name, nproc, micro in (("one", 1, None), ("one-micro", 1, 4), ("two", 2, None), ("two-micro", 2, 8)):
        recipe = tiny_mixture_recipe(**{"batch.size": 32, "batch.micro": micro, "method.langevin.gamma_z": 0.02})
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(recipe))
        out = tmp_path / f"{name}.pt"
        launch([str(script), str(f), str(out)], nproc)
        grads[name] = torch.load(out)
    ref = grads["one"]
    assert ref.abs().max() > 0
    for name, g in grads.items():
        assert torch.allclose(g, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-5), name
