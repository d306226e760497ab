"""What a run reports: metrics.jsonl (always) and plain, stable log lines."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch


class MetricsFile:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def tell(self) -> int:
        """Bytes written so far (checkpoints record it, so a resumed run can drop later records)."""
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class PlainLog:
    """One line per logged step and per event, no escape codes: the format for files, CI and nohup."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.enabled = enabled

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def step(self, r: dict[str, Any], total_steps: int, eta_s: float) -> None:
        width = len(str(total_steps))
        self.line(f"step {r['step']:>{width}}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                  f"grad {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | mem {r['mem_gib']:.2f} GiB | "
                  f"eta {format_duration(eta_s)}")

    def eval(self, r: dict[str, Any]) -> None:
        self.line(f"eval at step {r['step']}: loss {r['eval_loss']:.4f} | ppl {r['eval_ppl']:.2f} "
                  f"({r['eval_s']:.1f} s)")

    def event(self, text: str) -> None:
        self.line(text)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
