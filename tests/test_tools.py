"""The scripts under tools/ run (the GPU measurement in its CPU dry-run mode)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_measure_gpu_dry_run_measures_both_variants(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "measure_gpu.py"), "--dry-run", "--steps", "6",
                          "--results", str(tmp_path / "RESULTS.md")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l for l in out.stdout.splitlines() if l.startswith("| ") and "GiB" in l]
    assert len(rows) == 2 and not any("failed" in r for r in rows)
    assert "ReLoRA, NF4 base" in rows[0] and "full-rank" in rows[1]
    assert "| estimated allocated |" in out.stdout
    assert not (tmp_path / "RESULTS.md").exists()  # a dry run records nothing
