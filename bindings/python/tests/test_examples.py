"""The REPA example runs on the CPU at the `repa` grid (16x16 caller tokens against a 16x16
bridge grid, no pooling) and its alignment loss falls; under bf16 autocast and
torch.compile(fullgraph=True) (AlignLoss a custom op: one graph) it runs too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[3]


def run_example(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "repa_train.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "caller grid 16x16, bridge grid 16x16\n" in run.stdout, run.stdout
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stdout


def test_repa_example_alignment_loss_falls():
    result, out = run_example("--steps", "60")
    assert result["align_last"] < 0.8 * result["align_first"], out


def test_repa_example_compiles_in_one_graph_under_bf16_autocast():
    # aot_eager: the custom op's fake and autograd registrations, without inductor's compile time.
    # 10 steps: the first and last five (the windows the example averages) do not overlap.
    result, out = run_example("--steps", "10", "--bf16", "--compile", "aot_eager")
    assert result["align_last"] < result["align_first"], out


def run_ddp_example(out, nproc):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    script = str(ROOT / "examples" / "ddp_train.py")
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    run = subprocess.run([*launch, script, "--steps", "20", "--batch", "16", "--warmup", "5", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stdout


def test_the_ddp_example_trains_the_same_run_on_one_and_two_ranks(tmp_path):
    one, out1 = run_ddp_example(tmp_path / "one", 1)
    two, out2 = run_ddp_example(tmp_path / "two", 2)
    assert one["last_loss"] < 0.5 * one["first_loss"], out1
    assert abs(two["last_loss"] - one["last_loss"]) <= 1e-4 * one["last_loss"], (out1, out2)
    from dino_bridge import Bridge

    resumed = Bridge(two["checkpoint"])
    assert resumed.info()["step"] == 20
