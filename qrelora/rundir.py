"""The run directory: one run at a time in it, whether it can hold the run, and the run's plan.

One run per directory: an exclusive lock held from start-up to the end of training. The lock is an
`fcntl.flock` on `<run dir>/.lock`, so the kernel drops it when its process exits in any way (a crash or
`kill -9` included): a lock file left behind by a dead process is stale by construction and the next run
takes it. The file records the holder (pid, host, start time, command) so that a refused run can say who
holds it.

The plan is the run's length as [(step, total_steps), ...]: the total it was started with, plus one entry
per extension (`qrelora train --extend-to`). Checkpoints record it, so the schedule of an extended run
comes back on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list
from torch import nn

from . import checkpoint
from .config import Recipe
from .errors import EXIT_OK, BadInput, QreloraError
from .optim import OPTIMIZERS, resolve_optimizer_name
from .relora import adapter_layers, target_linears

LOCK_NAME = ".lock"


class RunDirLocked(BadInput):
    """Another live process trains in this run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this lock created, deepest first

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirLocked naming the holder; creates the run directory if needed."""
        self._created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_dir_if_created()
                raise RunDirLocked(_locked_message(self.run_dir, holder)) from None
            # The previous holder may have unlinked the file between our open and our flock: then we hold
            # a lock on a file nobody else can find, so try again on the one now at the path.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file goes too, and the run directory if this run created it and
        left nothing else in it (a run refused during start-up leaves no trace)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_dir_if_created()

    def _remove_dir_if_created(self) -> None:
        for d in self._created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                return

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _locked_message(run_dir: Path, holder: dict) -> str:
    who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')}: "
           f"{holder.get('command', '?')})") if holder else "another process"
    return (f"run directory {run_dir} is in use by {who}. Two runs writing one directory would overwrite each "
            "other's checkpoints and metrics, so this one was not started. Wait for that run to finish (or stop "
            "it), or use another directory with --run.output_dir=PATH.")


def lock_run_dir(run_dir: Path, accelerator) -> RunLock:
    """Lock the run directory from the main process; under data parallelism every process learns whether
    it could (and raises RunDirLocked if not)."""
    lock, refused = RunLock(run_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunDirLocked as e:
            refused = str(e)
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused:
        raise RunDirLocked(refused)
    return lock


class RunDirError(BadInput):
    """The run directory cannot be used (not writable, not enough free disk, nothing to extend)."""


class RunComplete(QreloraError):
    """The run directory already holds the final checkpoint of this run; nothing was done."""

    exit_code = EXIT_OK


def check_writable(run_dir: Path) -> None:
    """The run directory can be created and written, checked on the nearest existing ancestor so that a
    bad path leaves nothing behind."""
    existing = _nearest_existing(run_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir} cannot be created or written ({existing} is not a writable "
                          "directory). Choose another place with --run.output_dir=PATH.")


def check_free_disk(run_dir: Path, need_bytes: int, what: str) -> None:
    """A RunDirError naming `what` (the thing that needs the bytes) when the disk under run_dir has less free."""
    free = shutil.disk_usage(_nearest_existing(run_dir)).free
    if free < need_bytes:
        raise RunDirError(f"not enough free disk in {run_dir}: {what} need about {need_bytes / 2**30:.2f} GiB and "
                          f"{free / 2**30:.2f} GiB are free. Free some space, lower checkpoint.keep_last, or choose "
                          "another place with --run.output_dir=PATH.")


def check_disk_for_run(recipe: Recipe, model: nn.Module, device_type: str, done: int) -> None:
    """Fail now, not hours in, when the disk cannot hold what the run will write from step `done`: its
    checkpoints (up to keep_last + 1 at once, each the larger of the two phases' when a warm start comes first)
    and, for a run that switches to ReLoRA later with quant.master = "mmap", the master copy's files."""
    r, ckpt = recipe, recipe.checkpoint
    kind = OPTIMIZERS[resolve_optimizer_name(r.optim, device_type)]
    one = checkpoint.estimate_bytes(model, kind.state_bytes)
    switches_later = r.relora.enabled and not adapter_layers(model)
    if switches_later:
        one = max(one, checkpoint.relora_estimate_bytes(model, r, kind.state_bytes))
    checkpoints_dir = r.run_dir / "checkpoints"
    need = checkpoint.disk_needed(one, ckpt.keep_last, len(checkpoint.complete_checkpoints(checkpoints_dir)),
                                  checkpoint.saves_left(done, r.training.steps, ckpt.every))
    what = (f"the run's checkpoints ({one / 2**30:.2f} GiB each, up to keep_last = {ckpt.keep_last} of them plus "
            "the one being written)")
    if switches_later and r.quant.master == "mmap" and r.quant.merge == "exact":
        need += sum(4 * m.weight.numel() for _, m in target_linears(model))
        what += " and the master copy's files (quant.master = \"mmap\")"
    check_free_disk(r.run_dir, need, what)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def plan_run(recipe: Recipe, resume_from: Path | None, extend_to: int | None) -> tuple[list[tuple[int, int]], bool]:
    """(the run's plan, whether this start extends it). Raises RunComplete when a resumed run has nothing
    left to do, and BadInput subclasses for a checkpoint or extension that cannot be used."""
    run_dir, steps = recipe.run_dir, recipe.training.steps
    if resume_from is None:
        if extend_to is not None:
            raise RunDirError(f"--extend-to={extend_to}: there is no checkpoint to extend in {run_dir / 'checkpoints'} "
                              f"(checkpoint.resume = {recipe.checkpoint.resume!r}). To train {extend_to} steps from "
                              f"scratch, use --training.steps={extend_to}.")
        return [(0, steps)], False
    checkpoint.check_compatible(resume_from, recipe)
    checkpoint.check_loadable(resume_from, recipe.checkpoint.allow_pickle)
    done, plan = checkpoint.read_progress(resume_from)
    planned = plan[-1][1]
    if extend_to is None:
        if steps not in (plan[0][1], planned):
            raise checkpoint.CheckpointError(
                f"training.steps = {steps}, but the run in {run_dir} was planned for {planned} steps (checkpoint "
                f"{resume_from}). To change the length of this run, give the new total with --extend-to={steps}; "
                "to start afresh, --checkpoint.resume=never.")
        if done >= planned:
            raise RunComplete(_complete_message(run_dir, resume_from, done))
        return plan, False
    if extend_to <= done or extend_to == planned:
        raise RunDirError(f"--extend-to={extend_to}: the run in {run_dir} has done {done} of {planned} planned steps; "
                          f"give a new total above {done} and other than {planned}.")
    rl = recipe.relora
    if rl.enabled and (extend_to <= rl.warm_start_steps or (extend_to - rl.warm_start_steps) % rl.restart_every):
        cycles = max(1, (extend_to - rl.warm_start_steps) // rl.restart_every)
        options = sorted({rl.warm_start_steps + c * rl.restart_every for c in (cycles, cycles + 1)} - {planned})
        raise RunDirError(f"--extend-to={extend_to}: the ReLoRA phase must stay a whole number of cycles of "
                          f"relora.restart_every = {rl.restart_every} steps after the {rl.warm_start_steps} warm-start "
                          f"steps; choose e.g. --extend-to={options[-1]}.")
    return [*plan, (done, extend_to)], True


def _complete_message(run_dir: Path, resume_from: Path, done: int) -> str:
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    result = f", final eval loss {evals[-1]['eval_loss']:.4f}" if evals else ""
    return (f"the run in {run_dir} is complete: {done} of {done} steps{result} (checkpoint {resume_from}). Nothing "
            "was changed. To train it further, run the same command with --extend-to=STEPS (the new total); to start "
            "afresh, add --checkpoint.resume=never (this run's checkpoints and metrics are then replaced) or choose "
            "another directory with --run.output_dir=PATH.")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
