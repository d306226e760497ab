"""The scripts under tools/ run (the GPU measurement in its CPU dry-run mode)."""

import math
import subprocess
import sys
import tempfile
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


@pytest.mark.slow
def test_methods_benchmark_runs_the_peers_packages(tmp_path):
    """peft's LoRA, GaLore and APOLLO train through their own packages next to ours, and the table reports
    the memory each keeps: the low-rank methods' trainable state is below full-rank AdamW's."""
    results = tmp_path / "RESULTS.md"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_methods.py"), "--quick", "--one-seed",
                          "--no-tune", "--no-cache", "--only", "full-rank AdamW", "LoRA (ours)", "peft", "GaLore",
                          "APOLLO", "--results", str(results)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {cells[1].strip(): cells for cells in (l.split("|") for l in results.read_text().splitlines())
            if len(cells) == 10 and cells[3].strip()[:1].isdigit()}
    assert set(rows) == {"full-rank AdamW", "LoRA (ours), 16-bit base", "LoRA (peft), 16-bit base", "GaLore",
                         "APOLLO"}
    state = {name: float(cells[8].split()[0]) for name, cells in rows.items()}
    for name in ("LoRA (ours), 16-bit base", "LoRA (peft), 16-bit base", "GaLore", "APOLLO"):
        assert state[name] < state["full-rank AdamW"], (name, state)
    # a partial run plots to its own file, leaving the full run's methods_quick.png alone
    assert [f.name for f in tmp_path.glob("methods_quick*.png")] == [
        "methods_quick_only_full_rank_adamw_lora_ours_peft_galore_apollo.png"]


def test_each_method_is_tuned_until_its_best_rate_is_inside_the_grid():
    """The grid starts at 0.5x, 1x and 2x and grows by factors of 2 toward the better end until the best rate has
    a worse neighbour on each side; a failed run (diverged, or refused at that rate) counts as the worst."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_methods import Method, tune

    def valley(best):
        return lambda m, rate: {"eval_loss": abs(math.log2(rate / best))} if rate < 0.05 else {"failed": "diverged"}

    m = Method("m")
    assert tune(m, 1e-3, valley(1e-3)) == (1e-3, {5e-4: {"eval_loss": 1.0}, 1e-3: {"eval_loss": 0.0},
                                                  2e-3: {"eval_loss": 1.0}})
    rate, grid = tune(m, 1e-3, valley(8e-3))
    assert rate == 8e-3 and sorted(grid) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    rate, grid = tune(m, 1e-3, valley(1.25e-4))
    assert rate == 1.25e-4 and min(grid) == 6.25e-5
    rate, grid = tune(m, 2e-2, valley(1.0))  # better and better upwards until the runs fail
    assert rate == 4e-2 and "failed" in grid[8e-2]


@pytest.mark.slow
def test_step_profile_puts_dequantization_in_its_own_category(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_step.py"), "--quick", "--steps", "1", "2", "2",
                          "--layer-repeats", "2", "--results", str(results)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]]
            for cells in (line.split("|") for line in results.read_text().splitlines()) if len(cells) == 7}
    # columns: ReLoRA (reuse), ReLoRA (dequantize again in backward), ReLoRA (no checkpointing), full-rank
    dequant, adapters = rows["dequantize"], rows["adapter GEMMs"]
    assert all(float(v) > 0 for v in dequant[:3]) and float(dequant[3]) == 0
    assert all(float(v) > 0 for v in adapters[:3]) and float(adapters[3]) == 0
    assert float(rows["optimizer step"][3]) > 0 and float(rows["q/k/v/o and MLP GEMMs"][3]) > 0
    layer_rows = [line for line in results.read_text().splitlines() if line.startswith("| ReLoRA, ")]
    assert len(layer_rows) == 2 and "x" in layer_rows[0]
    assert "Command: `python tools/profile_step.py --quick --steps 1 2 2 --layer-repeats 2`;" in results.read_text()


@pytest.mark.slow
def test_recipes_on_card_dry_run_reports_every_phase():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "recipe_on_card.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "failed" not in out.stdout, out.stdout
    phases = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ")
              and not line.startswith("| phase") and not line.startswith("|---")]
    # 1b3: warm start, switch, merge, checkpoint; 7b: straight to NF4 from the meta device
    assert phases == ["build", "full-rank", "ReLoRA", "checkpoint", "build", "ReLoRA", "checkpoint"], out.stdout
    assert out.stdout.count("GiB on disk)") == 2
    assert not list(Path(tempfile.gettempdir()).glob("qrelora_card_*"))  # each run removed once measured


def test_merge_count_mode_shortens_the_cycles_of_the_same_relora_phase():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_methods
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from qrelora.recipe import load_recipe

    recipe, overrides = bench_methods.SCALES["default"]
    base = load_recipe(ROOT / recipe, overrides)
    runs = {m.name: m.overrides for m in bench_methods.merge_counts(base)}
    assert len(runs) == 9 and runs["ReLoRA, NF4 naive, 8 merges"] == ["--quant.bits=4", "--quant.merge=naive",
                                                                      "--relora.restart_every=56"]
    for name, o in runs.items():  # each run keeps the 450-step warm start, to within the rounding that makes the
        every = int(o[-1].split("=")[1])  # cycles whole: 900 steps = warm start + merges x cycle
        merges = int(name.split(", ")[-1].split()[0])
        warm_start = load_recipe(ROOT / recipe, [*overrides, *o]).relora.warm_start_steps
        assert warm_start == 900 - merges * every and 450 <= warm_start < 450 + merges, (name, warm_start)


def test_gpu_check_refuses_without_its_prepared_files(tmp_path):
    """On the lent machine nothing can be fetched: without .gpu/ (tools/gpu_prepare.sh) the script stops at once
    with exit 2 and names the fix, before touching the GPU."""
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "tools" / script)]).returncode == 0, script
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "speed"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "run 'bash tools/gpu_prepare.sh' first" in out.stderr
