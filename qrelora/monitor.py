"""What a run reports: metrics.jsonl (always) and plain, stable log lines."""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch


class MetricsFile:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so a crash loses nothing; with a
    TensorBoard directory, numeric fields also go there as scalars."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()
        if self._tb is not None:
            prefix = record.get("event", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "tokens"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def tell(self) -> int:
        """Bytes written so far (checkpoints record it, so a resumed run can drop later records)."""
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


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


# Dense bf16 peak of the accelerators users are likely to have (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12,
                   "4090": 165e12, "3090": 71e12, "A10G": 70e12, "L4": 121e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return f"{torch.cuda.get_device_name(device)} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    return f"CPU ({os.cpu_count()} cores)"


class PlainLog:
    """One line per logged step and per event, no escape codes: the format for files, CI and nohup."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.enabled = enabled

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def banner(self, info: dict[str, str]) -> None:
        self.line(f"qrelora {info.pop('run')}")
        width = max(len(k) for k in info)
        for key, value in info.items():
            self.line(f"  {key:<{width}}  {value}")

    def step(self, r: dict[str, Any], total_steps: int, eta_s: float, status: str = "") -> None:
        width = len(str(total_steps))
        text = (f"step {r['step']:>{width}}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"grad {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | mem {r['mem_gib']:.2f} GiB | "
                f"eta {format_duration(eta_s)}")
        self.line(text + (f" | {status}" if status else ""))

    def eval(self, r: dict[str, Any]) -> None:
        self.line(f"eval at step {r['step']}: loss {r['eval_loss']:.4f} | ppl {r['eval_ppl']:.2f} "
                  f"({r['eval_s']:.1f} s)")

    def event(self, text: str) -> None:
        self.line(text)

    def start(self, total_steps: int, first_step: int) -> None:
        """The run begins (before its first evaluation); a live display starts its clock here."""

    def advance(self, step: int) -> None:
        """Called after every optimizer step (not only logged ones); plain lines show nothing here."""

    def close(self) -> None:
        pass


class RichLog(PlainLog):
    """The terminal display: a banner, then a live progress bar with one status row; events and evals
    scroll above it."""

    def __init__(self, console=None, enabled: bool = True):
        from rich.console import Console

        super().__init__(enabled=enabled)
        self.console = console or Console()
        self.live = None
        self.smoothed_loss: float | None = None
        self.last_eval = "-"
        self.panel = None
        self.recent: collections.deque[str] = collections.deque(maxlen=12)
        self.row = None

    def line(self, text: str) -> None:
        if self.enabled:
            self.recent.append(text)
            self.console.print(text, highlight=False, markup=False)

    def screen(self):
        """What the terminal shows now: banner, the latest lines, progress and status (for snapshots)."""
        from rich.console import Group
        from rich.text import Text

        return Group(self.panel, *(Text(t) for t in self.recent), self.progress, self.row)

    def banner(self, info: dict[str, str]) -> None:
        from rich.panel import Panel
        from rich.table import Table

        if not self.enabled:
            return
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        title = info.pop("run")
        for key, value in info.items():
            table.add_row(key, value)
        self.panel = Panel(table, title=f"qrelora {title}", expand=False)
        self.console.print(self.panel)

    def _start(self, total_steps: int) -> None:
        from rich.live import Live
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console)
        self.task = self.progress.add_task("train", total=total_steps)
        self.live = Live(self.progress, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def status_table(self, r: dict[str, Any], status: str):
        from rich.table import Table

        table = Table(box=None, padding=(0, 1), show_edge=False)
        cells = {"loss": f"{self.smoothed_loss:.4f}", "eval loss / ppl": self.last_eval, "lr": f"{r['lr']:.2e}",
                 "grad": f"{r['grad_norm']:.3f}", "tok/s": f"{r['tokens_per_s']:,.0f}",
                 "MFU": f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
                 "mem": f"{r['mem_gib']:.2f} GiB", "step": f"{r.get('step_s', float('nan')):.2f} s",
                 "phase": status or "-"}
        for name in cells:
            table.add_column(name, style="bold" if name == "loss" else None)
        table.add_row(*cells.values())
        return table

    def step(self, r: dict[str, Any], total_steps: int, eta_s: float, status: str = "") -> None:
        from rich.console import Group

        if not self.enabled:
            return
        if self.live is None:
            self._start(total_steps)
        loss = r["loss"]
        self.smoothed_loss = loss if self.smoothed_loss is None else 0.6 * self.smoothed_loss + 0.4 * loss
        self.progress.update(self.task, completed=r["step"])
        self.row = self.status_table(r, status)
        self.live.update(Group(self.progress, self.row))

    def eval(self, r: dict[str, Any]) -> None:
        self.last_eval = f"{r['eval_loss']:.4f} / {r['eval_ppl']:.1f}"
        super().eval(r)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def make_log(no_live: bool = False) -> PlainLog:
    """The rich display on an interactive terminal, plain lines anywhere else (files, CI, nohup)."""
    if no_live or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        return PlainLog()
    return RichLog()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
