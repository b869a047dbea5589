"""`emdctl bench` runs on a CPU with tiny networks and reports ratios against its own baseline."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from emdctl.bench import run_bench
from emdctl.cli import app


def test_bench_sections_and_ratios(monkeypatch):
    """Each row times the baseline, then the configured variant, with the same call; a clock that
    says 0.5 s and then 0.2 s per call must come out as 2.5x, in the row's own units."""
    import emdctl.bench as bench

    timed = []

    def fake_timeit(fn, device, warmup, iters):
        fn()  # the call runs (it must work), the clock is ours
        timed.append(fn)
        return (0.5 if len(timed) % 2 else 0.2), None

    monkeypatch.setattr(bench, "_timeit", fake_timeit)
    res = run_bench("tiny", batch=2, K=1, device_name="cpu", dtype="fp32", iters=1, warmup=0)
    names = list(res["results"])
    assert len(names) == 5 and names[0] == "denoiser forward" and "EMD-1 training iteration" in names
    assert len(timed) == 10 and timed[0] is not timed[1]  # two separately built variants per row
    fwd, emd = res["results"]["denoiser forward"], res["results"]["EMD-1 training iteration"]
    assert (fwd["baseline"], fwd["configured"]) == pytest.approx((4.0, 10.0))
    assert fwd["unit"] == "img/s" and emd["unit"] == "it/s"  # batch 2 / seconds; iterations / seconds
    assert (emd["baseline"], emd["configured"]) == pytest.approx((2.0, 5.0))
    assert all(row["ratio"] == pytest.approx(2.5, rel=1e-12) for row in res["results"].values())
    assert res["info"]["baseline"] == "eager fp32" and res["info"]["torch"]


def test_bench_cli_table_and_bad_input(tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "bench",
            "--net",
            "mlp",
            "--batch",
            "4",
            "--k",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ratio" in r.stdout and (tmp_path / "b.json").is_file()
    r = runner.invoke(app, ["bench", "--net", "gpt"])
    assert r.exit_code == 2 and "--net" in r.stderr


def test_bench_sections_subset_and_unknown_section():
    res = run_bench("mlp", batch=2, K=1, device_name="cpu", dtype="fp32", iters=1, warmup=0, sections=("sample",))
    assert list(res["results"]) == ["one-step sampling"]
    r = CliRunner().invoke(app, ["bench", "--net", "mlp", "--device", "cpu", "--sections", "forward,everything"])
    assert r.exit_code == 2 and "--sections" in r.stderr and "everything" in r.stderr


COMPARE_UNFUSED = """
import torch
from emdctl import kernels
from emdctl.bench import run_bench

kernels.available = lambda device: True  # Triton's interpreter runs the kernel on CPU tensors
res = run_bench("mlp", batch=4, K=2, device_name="cpu", dtype="fp32", iters=1, warmup=0,
                sections=("emd", "langevin"), compare_unfused=True)
names = list(res["results"])
assert names == ["EMD-2 training iteration", "EMD-2 training iteration, fused update off",
                 "EMD-2 E-step (Langevin loop) + generator forward",
                 "EMD-2 E-step + generator forward, fused update off"], names
assert res["info"]["configured"].endswith("+fused"), res["info"]
assert all(r["configured"] > 0 for r in res["results"].values())
print("compare ok")
"""


@pytest.mark.slow
def test_bench_times_the_fused_update_off_in_the_same_run():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", COMPARE_UNFUSED], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "compare ok" in res.stdout, res.stdout + res.stderr
    # without a kernel to compare (CPU), no extra rows
    res = run_bench("mlp", batch=2, K=1, device_name="cpu", dtype="fp32", iters=1, warmup=0, sections=("emd",),
                    compare_unfused=True)  # fmt: skip
    assert list(res["results"]) == ["EMD-1 training iteration"]
