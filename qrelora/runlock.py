"""One run per run directory: an exclusive lock held from start-up to the end of training.

The lock is an `fcntl.flock` on `<run dir>/.lock`, so the kernel drops it when its process exits in any way
(a crash or `kill -9` included): a lock file left behind by a dead process is stale by construction and
the next run takes it. The file records the holder (pid, host, start time, command) so that a refused
run can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLocked(Exception):
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
