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
from qrelora.config import to_toml
from qrelora.recipe import load_recipe
from qrelora.monitor import PlainLog, RichLog, effective_rank, make_log
from qrelora.schedule import JaggedCosine
from qrelora.train import Trainer

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
                  "relora", "2 cycles of 4 steps", "restarting for the adapters only", "optimizer"):
        assert field in text, field
    for column in ("loss", "eval loss / ppl", "lr", "grad", "tok/s", "MFU", "mem", "step", "phase", "12/12"):
        assert column in text, column
    assert "merge 1 after step 8" in text and "effective rank" in text and "eval at step 12" in text


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def live_bar(log: RichLog) -> str:
    """The progress line as the terminal shows it now."""
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(log.progress)
    return console.export_text().strip()


def test_live_bar_shows_from_the_start_and_moves_every_step():
    clock = FakeClock()
    console = Console(record=True, width=120, force_terminal=True, file=io.StringIO())
    log = RichLog(console, clock=clock)
    log.start(20, 0)  # the trainer calls this before its first evaluation
    log.live.refresh()
    screen = console.export_text()
    assert "evaluating" in screen and "0/20" in screen  # not a blank screen while the model is evaluated
    clock.now += 30
    log.eval({"step": 0, "eval_loss": 9.0, "eval_ppl": 8103.1, "eval_s": 30.0})
    assert live_bar(log).startswith("train") and "0:00:30" in live_bar(log)  # elapsed since start()
    clock.now += 1.5
    log.advance(1)
    assert "1/20" in live_bar(log) and "eta -:--:--" in live_bar(log)  # one step says nothing about the rate
    for step in range(2, 6):  # every step moves the bar, not only logged ones
        clock.now += 1.0
        log.advance(step)
        assert f"{step}/20" in live_bar(log)
    assert "eta 0:00:15" in live_bar(log)  # 15 steps left at 1 s each
    clock.now += 1.0
    log.advance(20)
    assert "20/20" in live_bar(log) and "final eval" in live_bar(log) and "eta 0:00:00" in live_bar(log)
    log.close()
    assert log.live is None and live_bar(log).startswith("done")  # the frame left on the terminal


def test_live_eta_of_a_resumed_run_counts_only_this_sessions_steps():
    clock = FakeClock()
    log = RichLog(Console(width=120, force_terminal=True, file=io.StringIO()), clock=clock)
    log.start(100, 40)  # resumed at step 40: those steps were not done in this session
    assert "40/100" in live_bar(log) and live_bar(log).startswith("train")
    clock.now += 10  # the first step carries start-up costs
    log.advance(41)
    clock.now += 2
    log.advance(42)
    clock.now += 2
    log.advance(43)
    # 2 s per step over this session's steps: 57 left = 114 s (counting the 40 resumed steps would say ~19 s)
    assert "43/100" in live_bar(log) and "eta 0:01:54" in live_bar(log) and "0:00:14" in live_bar(log)
    log.close()  # interrupted: the frame left on the terminal must not say done
    assert live_bar(log).startswith("stopped") and "eta -:--:--" in live_bar(log)


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
    assert "learning rate: per step from config.toml, matching all 6 logged values" in out.stdout  # a real run's
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def plot_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plotted_learning_rate_is_the_schedule_per_step_not_dips_at_log_points(tmp_path):
    """log_every divides the cycle, so every merge falls on a logged step, whose lr is the pre-merge 0."""
    recipe = small_recipe(tmp_path, "--training.steps=40", "--relora.warm_start_steps=8", "--relora.restart_every=8",
                          "--relora.restart_warmup=3", "--training.log_every=4")
    (tmp_path / "config.toml").write_text(to_toml(recipe))
    t, r = recipe.training, recipe.relora
    schedule = JaggedCosine(lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
                            restart_every=r.restart_every, restart_warmup=r.restart_warmup,
                            relora_start=r.warm_start_steps, relora_lr_ratio=r.lr_ratio)
    merges = [{"step": s, "event": "merge"} for s in range(16, 41, 8)]
    logged = [{"step": s, "loss": 5.0, "lr": schedule(s - 1)} for s in range(4, 41, 4)]
    assert [x["lr"] for x in logged if x["step"] in (16, 24, 32, 40)] == [0.0] * 4  # the misleading dips
    steps, lrs, source = plot_tool().lr_curve(logged + merges, tmp_path)
    assert steps == list(range(1, 41)) and "matching all 10 logged values" in source
    assert [s for s, lr in zip(steps, lrs) if lr == 0] == [1, 16, 24, 32, 40]  # warm-up start, pre-merge steps
    assert lrs[16] < lrs[17] < lrs[18] == pytest.approx(schedule.envelope(18) * r.lr_ratio)  # the re-warm-up after a merge
    (tmp_path / "config.toml").unlink()  # no schedule to rebuild (or one that disagrees): the logged values
    steps, lrs, source = plot_tool().lr_curve(logged + merges, tmp_path)
    assert 0.0 not in lrs and steps == [4, 8, 12, 20, 28, 36] and source.startswith("logged every 4 steps")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_recipe_error(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes" / "tiny.toml"), "--run.tensorboard=true",
                 f"--run.output_dir={tmp_path}"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err
