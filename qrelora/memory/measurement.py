"""Measuring real steps: `measure` runs real training steps of a recipe (one merge included) and records
the peak of each phase and moment of a step (`Measurement`): on CUDA from torch's allocator statistics,
with a memory snapshot written to the run directory; on CPU from a `StorageTracker` following the real
tensors, by category.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Recipe
from ..device import check_device, device_type
from ..monitor import PlainLog
from ..train import Trainer
from .tracker import StorageTracker, bytes_by_role, register_all, roles_of

MOMENTS = ("after build", "forward", "backward", "optimizer step", "merge")


@dataclass
class Measurement:
    """Measured peaks of real training steps, by training phase and moment of the step."""

    device_type: str
    steps: int
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    """Training phase -> moment -> peak bytes (CUDA: allocated)."""
    reserved: dict[str, dict[str, int]] = field(default_factory=dict)
    """CUDA only: training phase -> moment -> peak reserved bytes."""
    categories: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """CPU only: training phase -> moment -> bytes by category at that moment's peak."""
    tokens_per_s: float = 0.0
    snapshot: str | None = None

    def record(self, phase: str, moment: str, peak: int, reserved: int | None = None,
               categories: dict[str, int] | None = None) -> None:
        if peak >= self.peaks.setdefault(phase, {}).get(moment, -1):
            self.peaks[phase][moment] = peak
            if categories is not None:
                self.categories.setdefault(phase, {})[moment] = categories
        if reserved is not None:
            self.reserved.setdefault(phase, {})[moment] = max(reserved, self.reserved.get(phase, {}).get(moment, 0))


def _measurement_recipe(recipe: Recipe, steps: int) -> Recipe:
    """The recipe cut to `steps` steps with the same phases: half of them full-rank when it has a warm
    start, then one ReLoRA cycle ending in a merge. No evaluation beyond one batch, no checkpoints."""
    r, t = recipe.relora, recipe.training
    warm = steps // 2 if r.enabled and r.warm_start_steps else 0
    return dataclasses.replace(
        recipe,
        run=dataclasses.replace(recipe.run, output_dir=str(recipe.run_dir / "memory"), tensorboard=False),
        training=dataclasses.replace(t, steps=steps, warmup_steps=0, eval_every=0, log_every=steps),
        relora=dataclasses.replace(r, warm_start_steps=warm, restart_every=steps - warm, restart_warmup=0),
        data=dataclasses.replace(recipe.data, eval_tokens=t.micro_batch_size * recipe.data.seq_len),
        checkpoint=dataclasses.replace(recipe.checkpoint, every=0, resume="never"),
    )


class _CudaPhases:
    """Peak allocated / reserved memory of each marked part of a step, from torch's CUDA statistics."""

    def __init__(self, measurement: Measurement, trainer):
        self.m, self.trainer = measurement, trainer

    @contextlib.contextmanager
    def __call__(self, moment: str):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        self.m.record(_training_phase(self.trainer), moment, torch.cuda.max_memory_allocated(),
                      torch.cuda.max_memory_reserved())


class _TrackedPhases:
    """Peak live tensor bytes of each marked part of a step, by category, from a StorageTracker."""

    CATEGORY = {"optimizer step": "optimizer step workspace", "merge": "merge workspace"}

    def __init__(self, measurement: Measurement, trainer, tracker: StorageTracker):
        self.m, self.trainer, self.tracker = measurement, trainer, tracker

    @contextlib.contextmanager
    def __call__(self, moment: str):
        phase = _training_phase(self.trainer)
        key = f"{phase}: {moment}"
        self.tracker.peak.pop(key, None)
        self.tracker.at_peak.pop(key, None)
        with self.tracker.in_phase(key, self.CATEGORY.get(moment)):
            yield
        relora = self.trainer.relora
        probes = [start for _, start in relora.rank_probes.values()] if relora.active else []
        roles = roles_of(self.trainer.unwrapped, self.trainer.optimizer, {"rank-probe copies": probes})
        self.m.record(phase, moment, self.tracker.peak[key], categories=self.tracker.by_category(key, roles))


def _training_phase(trainer) -> str:
    return "ReLoRA" if trainer.relora.active else "full-rank"


def measure(recipe: Recipe, steps: int, log=None) -> Measurement:
    """Run `steps` real training steps of the recipe (one merge included) and record each moment's peak.

    On CUDA the allocator's peaks are read and a memory snapshot (open it at pytorch.org/memory_viz) is
    written to <run dir>/memory/memory_snapshot.pickle, also when the run goes out of memory. On CPU a
    StorageTracker follows every real tensor."""
    check_device(recipe)
    r = _measurement_recipe(recipe, steps)
    cuda = device_type(r) == "cuda"
    m = Measurement("cuda" if cuda else "cpu", steps)
    snapshot = r.run_dir / "memory_snapshot.pickle"
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = Trainer(r, log or PlainLog(sys.stderr))  # stdout stays for the report (--json)
        if cuda:
            m.record(_training_phase(trainer), "after build", torch.cuda.memory_allocated(),
                     torch.cuda.memory_reserved())
            trainer.phases = _CudaPhases(m, trainer)
            tracking = contextlib.nullcontext()
        else:
            tracker = StorageTracker(len(trainer.tokenizer))
            register_all(tracker, trainer.unwrapped, trainer.optimizer)
            m.record(_training_phase(trainer), "after build", tracker.total,
                     categories=bytes_by_role(trainer.unwrapped, trainer.optimizer))
            trainer.phases = _TrackedPhases(m, trainer, tracker)
            tracking = tracker
        timed = []
        with tracking:
            while trainer.state.step < steps:
                record = trainer.step()
                if record is not None and trainer.state.step > 1:  # the first step pays for lazy initialisation
                    timed.append(record.seconds)
        m.tokens_per_s = len(timed) * r.tokens_per_step / sum(timed) if timed else 0.0
    finally:  # out of memory included: the snapshot shows what filled the card
        if trainer is not None:
            trainer.close()  # frees the run directory's lock
        if cuda:
            _dump_snapshot(snapshot)
            m.snapshot = str(snapshot)
    return m


def _dump_snapshot(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)
