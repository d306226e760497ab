"""What a run reports: metrics.jsonl (always) and plain, stable log lines."""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, TextIO

import torch

from .models import count_parameters
from .optim import resolve_optimizer_name
from .relora import codec_for, frozen_bytes


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


class RunReport:
    """What a run reports, in one place: metrics.jsonl records stamped with where the run is (`where()`
    gives the step and tokens), and the matching lines of the log."""

    def __init__(self, log: PlainLog, metrics: MetricsFile | None, where: Callable[[], dict[str, int]]):
        self.log, self.metrics, self.where = log, metrics, where

    def record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(self.where() | record)

    def event(self, record: dict[str, Any], text: str) -> None:
        self.record(record)
        self.log.event(text)

    def eval(self, loss: float, seconds: float) -> float:
        r = {"step": self.where()["step"], "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_s": seconds}
        self.record(r)
        self.log.eval(r)
        return loss

    def metrics_offset(self) -> int:
        """Bytes of metrics.jsonl written so far (a checkpoint records it: a resumed run drops what follows)."""
        return self.metrics.tell() if self.metrics is not None else 0

    def close(self) -> None:
        self.log.close()
        if self.metrics is not None:
            self.metrics.close()


class Throughput:
    """Tokens/s, step time, MFU and ETA over the steps since the last log line."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, device: torch.device, processes: int,
                 total_steps: int, first_step: int):
        self.device, self.tokens_per_step, self.flops_per_token = device, tokens_per_step, flops_per_token
        self.peak = peak_flops(device)
        self.processes, self.total_steps = processes, total_steps
        self.timer, self.started, self.first_step = Timer(), time.perf_counter(), first_step
        self.last_step = first_step

    def window(self, step: int) -> dict[str, float]:
        seconds, steps = self.timer.lap(), max(step - self.last_step, 1)
        self.last_step = step
        r = {"tokens_per_s": steps * self.tokens_per_step / seconds, "step_s": seconds / steps,
             "mem_gib": memory_gib(self.device)}
        if self.peak:
            r["mfu"] = r["tokens_per_s"] * self.flops_per_token / (self.peak * self.processes)
        return r

    def eta_s(self, step: int) -> float:
        rate = (step - self.first_step) / (time.perf_counter() - self.started)
        return (self.total_steps - step) / rate if rate > 0 else float("inf")


def run_info(trainer) -> dict[str, str]:
    """What the start-up banner shows about a Trainer's run."""
    r, t, world = trainer.recipe, trainer.recipe.training, trainer.accelerator.num_processes
    c = trainer.unwrapped.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    model = (f"{ {'llama': 'LLaMA', 'mistral': 'Mistral'}.get(c.model_type, c.model_type)}, hidden {c.hidden_size}, "
             f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads"
             + (f" ({kv} key/value)" if kv != c.num_attention_heads else "") + f", MLP {c.intermediate_size}, "
             f"vocabulary {c.vocab_size:,}" + (f" (tokenizer {len(trainer.tokenizer):,})"
                                               if len(trainer.tokenizer) != c.vocab_size else "")
             + (", tied embeddings" if getattr(c, "tie_word_embeddings", False) else "")
             + (f"; from {r.model.init_from}" if r.model.init_from else ""))
    info = {
        "run": f"{r.run.name} -> {trainer.run_dir}",
        "device": device_description(trainer.device) + (f" x {world} processes" if world > 1 else ""),
        "versions": ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "bitsandbytes", "accelerate")),
        "precision": f"{t.dtype} autocast, fp32 trainable weights",
        "model": model,
        "parameters": parameter_summary(trainer.unwrapped),
        "batch": f"{t.micro_batch_size} x {r.data.seq_len} tokens x {t.grad_accum} accumulation"
                 f"{f' x {world} processes' if world > 1 else ''} = {trainer.tokens_per_step:,} tokens/step; "
                 f"{t.steps:,} steps = {trainer.tokens_per_step * t.steps / 1e6:,.1f}M tokens",
        "optimizer": resolve_optimizer_name(r.optim, trainer.device.type),
    }
    if trainer.schedule.previous is not None:
        info["schedule"] = trainer.schedule.describe_extension()
    if r.relora.enabled:
        cycles = (t.steps - r.relora.warm_start_steps) // r.relora.restart_every
        info["relora"] = (f"rank {r.relora.rank}, {cycles} cycles of {r.relora.restart_every} steps after "
                          f"{r.relora.warm_start_steps} full-rank steps; {codec_for(r.quant, t.dtype).label} base, "
                          f"{r.quant.merge} merge, {r.relora.reset} reset {r.relora.reset_ratio:g}; "
                          f"{r.relora.lr_ratio:g}x rate, restarting for "
                          f"{'the adapters only' if r.relora.jagged == 'adapters' else 'every parameter'}")
    else:
        info["relora"] = "off (full-rank training)"
    return info


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: forward and input-gradient matmuls touch every weight (4 FLOPs each),
    weight gradients only the trainable ones (2 more); attention scores are left out."""
    total, trainable = count_parameters(model)
    return 4 * total + 2 * trainable


def parameter_summary(model: torch.nn.Module) -> str:
    total, trainable = count_parameters(model)
    frozen, frozen_n = frozen_bytes(model)
    text = f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"
    if frozen_n:
        text += f", {frozen_n / 1e6:.2f}M frozen in {frozen / 2**20:.1f} MiB ({frozen / frozen_n:.3f} B/param)"
    return text


def effective_rank(update: torch.Tensor, energy: float = 0.9) -> int:
    """Singular values needed to hold `energy` of the update's squared Frobenius norm."""
    s2 = torch.linalg.svdvals(update.float()).square()
    if s2.sum() == 0:
        return 0
    return int((torch.cumsum(s2, 0) / s2.sum() < energy).sum()) + 1


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def hms(seconds: float) -> str:
    """h:mm:ss, as rich's elapsed column writes it."""
    return str(datetime.timedelta(seconds=max(0, round(seconds)))) if math.isfinite(seconds) else "-:--:--"


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

    def __init__(self, console=None, enabled: bool = True, clock=time.monotonic):
        from rich.console import Console

        super().__init__(enabled=enabled)
        self.console = console or Console()
        self.clock = clock  # seconds; the elapsed and ETA columns read it (tests pass a fake one)
        self.live = None
        self.progress = None
        self.smoothed_loss: float | None = None
        self.last_eval = "-"
        self.panel = None
        self.recent: collections.deque[str] = collections.deque(maxlen=12)
        self.row = None
        self.total_steps = 0
        self.rate_origin: tuple[int, float] | None = None  # (step, time) the ETA's rate is measured from

    def line(self, text: str) -> None:
        if self.enabled:
            self.recent.append(text)
            self.console.print(text, highlight=False, markup=False)

    def screen(self):
        """What the terminal shows now: banner, the latest lines, progress and status (for snapshots)."""
        from rich.console import Group
        from rich.text import Text

        parts = (self.panel, *(Text(t) for t in self.recent), self.progress, self.row)
        return Group(*(part for part in parts if part is not None))

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

    def start(self, total_steps: int, first_step: int) -> None:
        """Show the bar at once (a fresh run evaluates the initial model first, which takes a while on a
        large one), with the elapsed clock running from here. Steps resumed from a checkpoint are shown as
        done but are not counted as done in this session, so they do not inflate the ETA's rate."""
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, \
            TimeElapsedColumn

        if not self.enabled or self.live is not None:
            return
        self.total_steps = total_steps
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                 console=self.console, get_time=self.clock)
        self.task = self.progress.add_task("evaluating" if first_step == 0 else "train", total=total_steps,
                                           completed=first_step, eta="-:--:--")
        self.live = Live(self.progress, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def advance(self, step: int) -> None:
        """Move the bar after every optimizer step. The ETA's rate counts from the end of this session's
        first step, so neither the first evaluation nor the first step's start-up costs (allocator and
        kernel warm-up) enter it; later evals, merges and checkpoints do, as they will recur."""
        if self.live is None:
            return
        now = self.clock()
        if self.rate_origin is None or step <= self.rate_origin[0]:
            self.rate_origin = (step, now)
        origin_step, origin_time = self.rate_origin
        eta = "-:--:--"
        if step > origin_step and now > origin_time:
            eta = hms((self.total_steps - step) * (now - origin_time) / (step - origin_step))
        self.progress.update(self.task, completed=step, eta=eta,
                             description="train" if step < self.total_steps else "final eval")

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
            self.start(total_steps, r["step"])
        loss = r["loss"]
        self.smoothed_loss = loss if self.smoothed_loss is None else 0.6 * self.smoothed_loss + 0.4 * loss
        self.row = self.status_table(r, status)
        self.live.update(Group(self.progress, self.row))

    def eval(self, r: dict[str, Any]) -> None:
        self.last_eval = f"{r['eval_loss']:.4f} / {r['eval_ppl']:.1f}"
        if self.live is not None and r["step"] < self.total_steps:
            self.progress.update(self.task, description="train")
        super().eval(r)

    def close(self) -> None:
        if self.live is not None:
            finished = self.progress.tasks[0].completed >= self.total_steps
            # The last frame stays on the terminal: it must not promise an ETA for a stopped run.
            self.progress.update(self.task, **({"description": "done"} if finished else
                                               {"description": "stopped", "eta": "-:--:--"}))
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
