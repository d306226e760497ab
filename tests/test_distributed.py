"""Data parallelism through torchrun on CPU (gloo): every rank ends every merge with identical weights, DDP does
not re-send the frozen codes, and a rank that drifted is caught after a merge."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["exact", "stochastic"])
def test_two_processes_end_with_identical_weights(tmp_path, merge):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    out = subprocess.run([torchrun, "--nproc_per_node", "2", str(ROOT / "tests" / "scripts" / "ddp_identical.py"),
                          str(tmp_path / "run"), merge], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"stdout: {out.stdout[-1000:]}\nstderr: {out.stderr[-8000:]}"
    assert "IDENTICAL" in out.stdout, out.stdout
    assert "DRIFT CAUGHT: after merge 2 (step 12) the data-parallel ranks hold different frozen weights" in out.stdout
    assert "NOT CAUGHT" not in out.stdout
