"""What a user sees: the banner, the live display, plain output off a terminal, and run plots."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qrelora.cli import main
from qrelora.config import load_recipe
from qrelora.monitor import PlainLog, RichLog, make_log
from qrelora.train import Trainer, effective_rank

from test_training import SMALL

ROOT = Path(__file__).resolve().parents[1]


def small_recipe(run_dir, *overrides):
    return load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={run_dir}", *SMALL, "--training.steps=12",
                                                        "--training.warmup_steps=2", "--relora.warm_start_steps=4",
                                                        "--relora.restart_every=4", "--relora.restart_warmup=1",
                                                        "--training.log_every=2", *overrides])


def test_banner_and_live_row_show_what_a_user_needs(tmp_path):
    console = Console(record=True, width=160, force_terminal=True)
    log = RichLog(console)
    trainer = Trainer(small_recipe(tmp_path), log)
    trainer.run()
    text = console.export_text()
    for field in ("device", "CPU (", "versions", "torch", "bitsandbytes", "precision", "bf16 autocast", "model",
                  "hidden 64, 2 layers", "parameters", "trainable", "frozen in", "batch", "tokens/step",
                  "relora", "2 cycles of 4 steps", "optimizer"):
        assert field in text, field
    for column in ("loss", "eval loss / ppl", "lr", "grad", "tok/s", "MFU", "mem", "step", "phase", "12/12"):
        assert column in text, column
    assert "merge 1 after step 8" in text and "effective rank" in text and "eval at step 12" in text


def test_off_a_terminal_output_is_plain_lines(tmp_path):
    assert type(make_log()) is PlainLog  # pytest's stdout is not a terminal
    assert type(make_log(no_live=True)) is PlainLog
    out = io.StringIO()
    Trainer(small_recipe(tmp_path), PlainLog(out)).run()
    text = out.getvalue()
    assert "\x1b[" not in text  # no escape codes
    assert "step  2/12 |" in text and "| warm start, ReLoRA in 2" in text and "step 12/12 |" in text
    assert "phase" not in text  # no table headers: one line per log


def test_effective_rank_of_the_accumulated_update_grows_across_merges(tmp_path):
    """Each cycle adds a rank-2 update in new directions: the accumulated update's rank must grow."""
    recipe = small_recipe(tmp_path, "--relora.rank=2", "--training.steps=28", "--training.min_lr_ratio=1.0",
                          "--relora.restart_every=6", "--relora.restart_warmup=1", "--training.lr=3e-3")
    Trainer(recipe, PlainLog(io.StringIO())).run()
    merges = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"merge"' in l]
    assert len(merges) == 4
    for name in merges[0]["effective_rank"]:
        ranks = [m["effective_rank"][name] for m in merges]
        assert ranks[-1] > ranks[0] and ranks[-1] > 2, (name, ranks)  # beyond any single rank-2 adapter


def test_effective_rank_definition():
    u = torch.linalg.qr(torch.randn(64, 64))[0]
    assert effective_rank(u[:, :5] @ torch.diag(torch.ones(5)) @ u[:, :5].T) == 5  # equal energy: 90% needs 5
    assert effective_rank(torch.zeros(8, 8)) == 0


def test_plot_metrics_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    Trainer(small_recipe(tmp_path / "run"), PlainLog(io.StringIO())).run()
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_recipe_error(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes" / "tiny.toml"), "--run.tensorboard=true",
                 f"--run.output_dir={tmp_path}"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
