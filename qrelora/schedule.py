"""The jagged cosine learning-rate schedule of ReLoRA, as a pure function of the step.

Being a function of the step alone, it needs no state of its own: a resumed run gets it back from the
step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class JaggedCosine:
    lr: float
    """Peak learning rate."""
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float
    restart_every: int = 0
    """Cycle length of the ReLoRA phase; 0 means no restarts (plain warm-up + cosine)."""
    restart_warmup: int = 0
    relora_start: int = 0
    """First step of the ReLoRA phase (the warm-start length)."""

    def envelope(self, step: int) -> float:
        """Linear warm-up from 0, then one cosine over the rest of the run down to min_lr_ratio * lr."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def restart_ramp(self, step: int) -> float:
        """The jagged part: 0 on the last step of every cycle (the step just before its merge moves no
        weights), then a linear ramp over restart_warmup steps back to the envelope.

        The first cycle ramps only when it follows a full-rank warm start; with no warm start the global
        warm-up already covers it.
        """
        if self.restart_every <= 0 or step < self.relora_start:
            return 1.0
        if self.merges_after(step):
            return 0.0
        cycle, pos = divmod(step - self.relora_start, self.restart_every)
        if self.restart_warmup <= 0 or (cycle == 0 and self.relora_start == 0):
            return 1.0
        return min(1.0, (pos + 1) / self.restart_warmup)

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        return self.envelope(step) * self.restart_ramp(step)

    def merges_after(self, step: int) -> bool:
        """Whether adapters are merged right after optimizer step `step` (0-based): at the end of every
        cycle of the ReLoRA phase, the last one included, so a run ends with everything merged."""
        if self.restart_every <= 0 or step < self.relora_start:
            return False
        return (step + 1 - self.relora_start) % self.restart_every == 0
