"""Checkpoints, exact resume, faults and bad input around a run, export and eval."""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qrelora import checkpoint
from qrelora.checkpoint import CheckpointError
from qrelora.cli import main
from qrelora.recipe import load_recipe
from qrelora.monitor import PlainLog
from qrelora.train import Trainer, TrainingDiverged, TrainingInterrupted

from test_training import SMALL

ROOT = Path(__file__).resolve().parents[1]
RELORA = ["--training.steps=30", "--training.warmup_steps=3", "--relora.warm_start_steps=10",
          "--relora.restart_every=10", "--relora.restart_warmup=2", "--relora.dropout=0.1"]


def recipe(run_dir, *overrides):
    return load_recipe(ROOT / "recipes" / "tiny.toml", [f"--run.output_dir={run_dir}", *SMALL, *RELORA, *overrides])


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def interrupt_after(trainer, step):
    """Deliver SIGINT while step `step` (1-based) runs, as a user pressing Ctrl-C would."""
    original = trainer.train_step

    def train_step(lr, **rates):
        if trainer.state.step == step - 1:
            signal.raise_signal(signal.SIGINT)
        return original(lr, **rates)

    trainer.train_step = train_step


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, init", [(15, "zero"), (10, "zero"), (15, "residual")])
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, stop_at, init):
    """Stop mid-cycle (15: between merges, resume crosses two merges) or at the warm-start switch (10); with
    adapters that start from the quantization residual, too."""
    start = f"--relora.init={init}"
    Trainer(recipe(tmp_path / "a", start), PlainLog(io.StringIO())).run()
    first = Trainer(recipe(tmp_path / "b", start), PlainLog(io.StringIO()))
    interrupt_after(first, stop_at)
    with pytest.raises(TrainingInterrupted):
        first.run()
    assert (tmp_path / "b" / "checkpoints" / f"step_{stop_at:08d}").is_dir()
    resumed = Trainer(recipe(tmp_path / "b", start), PlainLog(io.StringIO()))
    assert resumed.state.step == stop_at
    resumed.run()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    losses_a = [(r["step"], r["loss"]) for r in a if "loss" in r]
    losses_b = [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert len(losses_a) == 30 and losses_a == losses_b  # exactly equal, step by step
    evals = lambda rs: [(r["step"], r["eval_loss"]) for r in rs if "eval_loss" in r]  # noqa: E731
    assert evals(a) == evals(b)
    merges = lambda rs: [(r["step"], r["update_ratio"], r["effective_rank"])  # noqa: E731
                         for r in rs if r.get("event") == "merge"]
    assert merges(a) == merges(b) and len(merges(a)) == 2


def test_sigint_exits_130_with_a_resume_hint(tmp_path, capsys, monkeypatch):
    original = Trainer.train_step

    def train_step(self, lr, **rates):
        if self.state.step == 4:
            signal.raise_signal(signal.SIGINT)
        return original(self, lr, **rates)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    code = main(["train", str(ROOT / "recipes" / "tiny.toml"), f"--run.output_dir={tmp_path}", *SMALL, *RELORA])
    assert code == 130
    out = capsys.readouterr().out
    assert "SIGINT received: stopped after step 5" in out and "Resume with the same command" in out
    assert (tmp_path / "checkpoints" / "step_00000005").is_dir()


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qrelora", "train", str(ROOT / "recipes" / "tiny.toml"), f"--run.output_dir={run}",
           *SMALL, "--training.steps=400", "--training.warmup_steps=3", "--relora.warm_start_steps=0",
           "--relora.restart_every=20", "--relora.restart_warmup=2", "--checkpoint.every=2", "--checkpoint.keep_last=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    killed_during_write = False
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("step_*")] if ckpts.exists() else []
        partial = list(ckpts.glob(".tmp-step_*")) if ckpts.exists() else []
        if done and partial:
            os.kill(proc.pid, signal.SIGKILL)
            killed_during_write = True
            break
        time.sleep(0.001)
    proc.wait(timeout=30)
    assert killed_during_write, "never caught a checkpoint being written"
    assert list(ckpts.glob(".tmp-step_*"))  # the half-written one is still there ...
    resumed = Trainer(load_recipe(ROOT / "recipes" / "tiny.toml", cmd[5:] + ["--training.steps=400"]),
                      PlainLog(io.StringIO()))
    assert resumed.resumed_from.name.startswith("step_") and resumed.state.step > 0  # ... and ignored
    steps_before = resumed.state.step
    resumed.recipe.training.steps = steps_before + 2  # finish quickly
    resumed.schedule = dataclasses.replace(resumed.schedule, total_steps=steps_before + 2)
    resumed.run()
    assert resumed.state.step == steps_before + 2


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, capsys):
    base = [str(ROOT / "recipes" / "tiny.toml"), f"--run.output_dir={tmp_path}", *SMALL, *RELORA,
            "--training.steps=10", "--relora.warm_start_steps=0", "--relora.restart_every=5"]
    assert main(["train", *base]) == 0
    assert main(["train", *base, "--model.hidden_size=128"]) == 2
    err = capsys.readouterr().err
    assert "written by a different recipe" in err and "[model] hidden_size: checkpoint has 64, recipe has 128" in err
    assert "Traceback" not in err


def test_optimizer_state_of_other_parameter_groups_is_a_clear_error(tmp_path, monkeypatch):
    """The ReLoRA phase's optimizer keeps the adapters in a group of their own (their rate is jagged, the
    others' smooth). A checkpoint whose optimizer grouped the parameters otherwise (as earlier versions did)
    names the fix instead of torch's ValueError."""
    run = recipe(tmp_path, "--training.steps=20", "--checkpoint.every=12")
    first = Trainer(run, PlainLog(io.StringIO()))
    first.run()
    # The last step ends a cycle: the adapters' rate is zero there, the embeddings' and norms' is not.
    rates = {g["role"]: g["lr"] for g in first.optimizer.param_groups}
    ratio = first.recipe.training.embedding_lr_ratio
    assert rates["adapters"] == 0.0 and rates["embeddings"] == pytest.approx(first.schedule.full_rate(19) * ratio)
    assert rates["embeddings"] > 0
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000020")  # resume mid-phase, from step 12
    one_group = lambda model, weight_decay, ratio: [{"params": [p for p in model.parameters() if p.requires_grad]}]  # noqa: E731
    monkeypatch.setattr("qrelora.optim.param_groups", one_group)
    with pytest.raises(CheckpointError, match="does not fit this run's optimizer.*--checkpoint.resume=never"):
        Trainer(run, PlainLog(io.StringIO()))


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    trainer = Trainer(recipe(tmp_path / "a", "--relora.enabled=false", "--training.steps=8"), PlainLog(io.StringIO()))
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 3rd and 4th training forward passes produce NaN hidden states
        if not module.training:
            return output
        calls["n"] += 1
        return output * float("nan") if calls["n"] in (3, 4) else output

    trainer.unwrapped.model.norm.register_forward_hook(poison)  # the last module before the LM head
    trainer.run()
    rs = records(tmp_path / "a")
    assert [r["in_a_row"] for r in rs if r.get("event") == "skipped_step"] == [1, 2]
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())
    assert trainer.state.step == 8

    trainer = Trainer(recipe(tmp_path / "b", "--relora.enabled=false", "--training.steps=8",
                             "--training.max_bad_steps=3", "--checkpoint.every=2"), PlainLog(io.StringIO()))
    trainer.unwrapped.model.norm.register_forward_hook(
        lambda m, i, o: o * float("nan") if trainer.state.step >= 3 and m.training else o)
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.run()
    assert (tmp_path / "b" / "checkpoints" / "step_00000002").is_dir()


def test_unusable_run_directory_and_full_disk_exit_2_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["train", str(ROOT / "recipes" / "tiny.toml"), *SMALL, "--training.steps=4", "--training.warmup_steps=1",
            "--relora.enabled=false"]
    assert main([*args, f"--run.output_dir={blocker / 'run'}"]) == 2
    assert "is not a writable directory" in capsys.readouterr().err

    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert main([*args, f"--run.output_dir={tmp_path / 'run'}"]) == 2
    assert "not enough free disk" in (err := capsys.readouterr().err) and "keep_last = 2" in err
    assert not (tmp_path / "run").exists()


def test_the_disk_check_knows_both_phases_checkpoint_sizes_before_training(tmp_path):
    """What the start-up disk check computes from the full-rank model is what the saves write: a
    warm-start checkpoint and, laid out on fake tensors before the switch, a ReLoRA-phase one."""
    from qrelora.optim import OPTIMIZERS

    trainer = Trainer(recipe(tmp_path, "--training.steps=4", "--relora.warm_start_steps=2",
                             "--relora.restart_every=2", "--relora.restart_warmup=1", "--checkpoint.every=1",
                             "--checkpoint.keep_last=4"),
                      PlainLog(io.StringIO()))
    state_bytes = OPTIMIZERS["adamw"].state_bytes
    warm = checkpoint.estimate_bytes(trainer.unwrapped, state_bytes)
    relora = checkpoint.relora_estimate_bytes(trainer.unwrapped, trainer.recipe, state_bytes)
    trainer.run()

    def on_disk(step):
        return sum(f.stat().st_size for f in (tmp_path / "checkpoints" / f"step_{step:08d}").iterdir())

    assert relora < warm  # NF4 codes and an fp32 master against fp32 weights and two moments per matrix
    for predicted, step in ((warm, 1), (relora, 3)):
        assert predicted <= on_disk(step) <= 1.02 * predicted + 200_000  # headers, RNG state, config


def test_disk_need_counts_every_checkpoint_a_run_keeps_at_once():
    """Each save is written whole before the oldest beyond keep_last goes: keep_last + 1 exist at once."""
    assert checkpoint.saves_left(0, 1000, 100) == 10  # steps 100..900 and the end
    assert checkpoint.saves_left(450, 1000, 100) == 6
    assert checkpoint.saves_left(0, 1000, 0) == 1
    assert checkpoint.disk_needed(10, keep_last=2, existing=0, saves=10) == 30
    assert checkpoint.disk_needed(10, keep_last=2, existing=0, saves=1) == 10  # a short run writes one
    assert checkpoint.disk_needed(10, keep_last=2, existing=2, saves=5) == 10  # two are already paid for
    assert checkpoint.disk_needed(10, keep_last=1, existing=3, saves=5) == 10  # the new one comes before pruning


@pytest.mark.slow
@pytest.mark.parametrize("bits,dtype,tolerance", [(16, "fp32", 1e-4), (4, "bf16", 0.02)])
def test_export_round_trip(tmp_path, bits, dtype, tolerance, capsys):
    """The exported model, loaded by plain transformers, scores what `qrelora eval` gives the checkpoint:
    to 1e-4 for a 16-bit base in fp32; for NF4 the export holds the exact master (not its 4-bit rounding)
    in bf16, so it may differ by the quantization error: within 2% measured here."""
    run = tmp_path / "run"
    r = recipe(run, f"--quant.bits={bits}", f"--training.dtype={dtype}", "--training.steps=20",
               "--relora.restart_every=5", "--relora.warm_start_steps=5")
    Trainer(r, PlainLog(io.StringIO())).run()
    ckpt = run / "checkpoints" / "step_00000020"
    assert main(["eval", str(ckpt), "--json"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    out = tmp_path / "export"
    assert main(["export", str(ckpt), str(out), f"--dtype={dtype}"]) == 0
    capsys.readouterr()

    from transformers import AutoModelForCausalLM

    from qrelora.data import build_data, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = load_tokenizer(str(out))
    batches = build_data(r.data, tokenizer, r.training.seed).eval_batches(r.training.micro_batch_size)
    with torch.no_grad():
        plain = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    assert abs(plain - from_checkpoint["eval_loss"]) <= tolerance * from_checkpoint["eval_loss"]
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(plain, rel=1e-6)
    assert main(["export", str(ckpt), str(out)]) == 2  # never overwrites


@pytest.mark.slow
def test_init_from_an_exported_model_starts_where_it_ended(tmp_path, capsys):
    """model.init_from: ReLoRA from a Hugging Face model directory (here, one this tool exported)."""
    run = tmp_path / "run"
    Trainer(recipe(run, "--relora.enabled=false", "--training.steps=6", "--training.dtype=fp32"),
            PlainLog(io.StringIO())).run()
    assert main(["export", str(run / "checkpoints" / "step_00000006"), str(tmp_path / "hf"), "--dtype=fp32"]) == 0
    capsys.readouterr()
    second = Trainer(recipe(tmp_path / "second", f"--model.init_from={tmp_path / 'hf'}", "--training.dtype=fp32",
                            "--quant.bits=16",
                            "--relora.warm_start_steps=0", "--relora.restart_every=5", "--training.steps=10",
                            "--training.warmup_steps=2"), PlainLog(io.StringIO()))
    result = second.run()
    first_run_end = [r for r in records(run) if "eval_loss" in r][-1]["eval_loss"]
    assert result["first_eval_loss"] == pytest.approx(first_run_end, rel=1e-5)
