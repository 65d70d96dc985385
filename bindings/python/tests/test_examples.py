"""The REPA example runs on the CPU at the `repa` grid (16x16 caller tokens against a 16x16
bridge grid, no pooling) and its alignment loss falls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[3]


def test_repa_example_alignment_loss_falls():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "bindings" / "python"))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "repa_train.py"), "--steps", "60"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "caller grid 16x16, bridge grid 16x16\n" in run.stdout, run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["align_last"] < 0.8 * result["align_first"], run.stdout
