"""A run directory as users share and reuse it: checkpoints from others, two runs at once, running a
finished run again, and extending a run."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrelora import checkpoint
from qrelora.cli import main
from qrelora.recipe import load_recipe
from qrelora.monitor import PlainLog
from qrelora.train import Trainer

from test_training import SMALL

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
# 12 steps: 4 full-rank, then two ReLoRA cycles of 4
RUN = [*SMALL, "--training.steps=12", "--training.warmup_steps=2", "--relora.warm_start_steps=4",
       "--relora.restart_every=4", "--relora.restart_warmup=1"]


def train(run_dir, *extra):
    return main(["train", TINY, f"--run.output_dir={run_dir}", *RUN, *extra])


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir):
    """Every file of a run directory with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


class WritesMarker:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path, capsys):
    """A checkpoint in the old layout whose optimizer.pt / rng.pt are crafted pickles: resuming it is
    refused (exit 2) with and without the opt-in, and no code runs; eval and export need no pickle."""
    run = tmp_path / "run"
    assert train(run, "--relora.enabled=false", "--training.steps=2", "--training.warmup_steps=1") == 0
    ckpt = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "marker"
    for name in ("optimizer", "rng"):
        (ckpt / f"{name}.safetensors").unlink(missing_ok=True)
        torch.save({"state": WritesMarker(marker)}, ckpt / f"{name}.pt")  # as a torch checkpoint would be
    (ckpt / "trainer.json").write_text(json.dumps(json.loads((ckpt / "trainer.json").read_text()) | {"step": 1}))
    capsys.readouterr()

    args = ["--relora.enabled=false", "--training.steps=2", "--training.warmup_steps=1"]
    def attempt(*extra):  # whatever happens to the run, the first question is whether code ran
        try:
            return train(run, *args, *extra)
        except Exception as e:  # noqa: BLE001
            return e

    code = attempt()
    assert not marker.exists()
    err = capsys.readouterr().err
    assert code == 2 and "Python pickles" in err and "--checkpoint.allow_pickle=true" in err

    code = attempt("--checkpoint.allow_pickle=true")
    assert not marker.exists()
    assert code == 2 and "hold something other than tensors and plain values" in capsys.readouterr().err

    assert main(["eval", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0
    assert not marker.exists()


def test_old_layout_checkpoints_resume_with_the_opt_in(tmp_path, capsys):
    """A genuine checkpoint of the old layout (torch.save of the same states) resumes with the opt-in only."""
    run = tmp_path / "run"
    args = ["--relora.enabled=false", "--training.steps=4", "--training.warmup_steps=1", "--checkpoint.every=2"]
    assert train(run, *args) == 0
    ckpt = run / "checkpoints" / "step_00000002"
    for name in ("optimizer", "rng"):
        torch.save(checkpoint.load_tree(ckpt / f"{name}.safetensors"), ckpt / f"{name}.pt")
        (ckpt / f"{name}.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert train(run, *args) == 2
    assert train(run, *args, "--checkpoint.allow_pickle=true") == 0
    out = capsys.readouterr().out
    assert "warning: read the pickled optimizer and RNG states" in out
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000004").iterdir()) == sorted(checkpoint.FILES)


def test_state_files_keep_types_and_shared_tensors(tmp_path):
    table = torch.arange(4.0)
    tree = {"state": {0: {"step": 3, "m": torch.ones(2, 3), "q": table, "nested": {"q": table}}},
            "param_groups": [{"betas": (0.9, 0.95), "params": [0], "name": None, "flag": True, "lr": 1e-3}]}
    checkpoint.save_tree(tmp_path / "s.safetensors", tree)
    back = checkpoint.load_tree(tmp_path / "s.safetensors")
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["param_groups"][0]["name"] is None and back["param_groups"][0]["flag"] is True
    assert torch.equal(back["state"][0]["nested"]["q"], table) and back["state"][0]["step"] == 3
    with pytest.raises(TypeError, match="only tensors and plain values"):
        checkpoint.save_tree(tmp_path / "bad.safetensors", {"x": object()})


HOLD_LOCK = ("import sys, time; from qrelora.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_one_run_per_directory(tmp_path, capsys):
    """A second run on a directory in use is refused (exit 2) naming the holder; a holder killed with
    SIGKILL leaves a stale lock file that the next run takes over; a run refused at start-up leaves no
    directory behind."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(run) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in err and "--run.output_dir" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # what a crash leaves behind
    assert train(run, "--training.steps=4", "--relora.warm_start_steps=0", "--relora.restart_every=2",
                   "--training.warmup_steps=1", "--relora.restart_warmup=0") == 0
    assert not (run / ".lock").exists()

    # A real trainer holds the directory from start-up; `qrelora train` in another process is refused.
    other = tmp_path / "other"
    trainer = Trainer(load_recipe(TINY, [f"--run.output_dir={other}", *RUN]), PlainLog(enabled=False))
    try:
        proc = subprocess.run([sys.executable, "-m", "qrelora", "train", TINY, f"--run.output_dir={other}", *RUN],
                              capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    finally:
        trainer.close()
    assert proc.returncode == 2, proc.stderr
    assert f"is in use by process {os.getpid()}" in proc.stderr


@pytest.mark.slow
def test_a_finished_run_is_left_alone_and_can_be_extended(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    ckpt_modes = {p.stat().st_mode & 0o777 for p in (run / "checkpoints" / "step_00000012").iterdir()}
    assert len(ckpt_modes) == 1  # safetensors alone would write its files 600, the others 644
    before = snapshot(run)
    capsys.readouterr()

    assert train(run) == 0  # `make train` again
    out = capsys.readouterr().out
    assert "is complete: 12 of 12 steps" in out and "--extend-to=STEPS" in out and "--checkpoint.resume=never" in out
    assert snapshot(run) == before  # nothing rewritten

    assert train(run, "--extend-to=18") == 2  # 18 - 4 warm-start steps is not a whole number of cycles of 4
    assert "choose e.g. --extend-to=20" in capsys.readouterr().err
    assert train(tmp_path / "empty", "--extend-to=20") == 2
    assert "no checkpoint to extend" in capsys.readouterr().err
    assert train(run, "--training.steps=20") == 2
    assert "--extend-to=20" in capsys.readouterr().err
    assert snapshot(run) == before

    assert train(run, "--extend-to=20") == 0
    out = capsys.readouterr().out
    assert "extended at step 12 to 20" in out
    rs = records(run)
    extend = [r for r in rs if r.get("event") == "extend"]
    assert extend == [{"step": 12, "tokens": extend[0]["tokens"], "event": "extend", "from_steps": 12,
                       "to_steps": 20, "lr_at_step": extend[0]["lr_at_step"]}]
    lrs = {r["step"]: r["lr"] for r in rs if "lr" in r}
    assert sorted(lrs) == list(range(1, 21))
    recipe = load_recipe(TINY, [f"--run.output_dir={run}", *RUN])
    # the last step of the first plan ran at lr 0 before its merge; the tail starts from the envelope's end
    # (min_lr) and eases towards the cosine planned for 20 steps over warmup_steps = 2 steps
    min_lr = recipe.training.lr * recipe.training.min_lr_ratio * recipe.relora.lr_ratio  # the ReLoRA phase's
    assert lrs[12] == 0.0 and lrs[13] == pytest.approx(min_lr)  # step 13 is a cycle's first step: ramp 1/1
    assert lrs[15] > lrs[13] and lrs[16] == 0.0
    assert [r["step"] for r in rs if r.get("event") == "merge"] == [8, 12, 16, 20]
    assert checkpoint.read_progress(run / "checkpoints" / "step_00000020") == (20, [(0, 12), (12, 20)])

    capsys.readouterr()
    assert train(run) == 0  # the original command again: the run's own plan (20 steps) is complete
    assert "is complete: 20 of 20 steps" in capsys.readouterr().out
