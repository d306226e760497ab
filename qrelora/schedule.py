"""The jagged cosine learning-rate schedule of ReLoRA, as a pure function of the step.

Two rates come out of it in the ReLoRA phase: the adapters' jagged one (`__call__`, at relora.lr_ratio times
the envelope), which drops to zero before every merge and re-warms after it, and the rate of the parameters
that train in full (embeddings, norms, head: `full_rate`). Those have no restarts, so by default they stay on
the smooth envelope; with `jagged_all` they follow the adapters' jags, as in the reference code of Lialin et
al. (2023). Each parameter group scales its rate by its own multiple (optim.param_groups).

Being a function of the step alone, it needs no state of its own: a resumed run gets it back from the
step counter (and, for a run that was extended, from the plan its checkpoint records).
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
    relora_lr_ratio: float = 1.0
    """The ReLoRA phase follows this multiple of the envelope (relora.lr_ratio)."""
    jagged_all: bool = False
    """Whether the parameters that train in full also restart with the adapters (relora.jagged = "all")."""
    extended_at: int = 0
    """For a run extended to total_steps: the step from which this plan holds (0: planned from the start)."""
    previous: JaggedCosine | None = None
    """The plan the run followed before extended_at."""

    @classmethod
    def for_plan(cls, plan: list[tuple[int, int]], **kwargs) -> JaggedCosine:
        """The schedule of a run whose length was set at each (step, total_steps) of plan, oldest first."""
        schedule = None
        for at, total in plan:
            schedule = cls(total_steps=total, extended_at=at, previous=schedule, **kwargs)
        return schedule

    def envelope(self, step: int) -> float:
        """Linear warm-up from 0, then one cosine over the rest of the run down to min_lr_ratio * lr.

        After an extension the envelope is the cosine planned for the new total, eased into linearly over
        warmup_steps from the value the old plan had at the extension step, so the learning rate never
        jumps (a finished run resumes from min_lr and climbs back to the longer cosine).
        """
        if self.previous is None:
            return self._cosine(step)
        if step < self.extended_at:
            return self.previous.envelope(step)
        start, planned = self.previous.envelope(self.extended_at), self._cosine(step)
        ease = min(1.0, (step - self.extended_at) / self.warmup_steps) if self.warmup_steps else 1.0
        return start + (planned - start) * ease

    def describe_extension(self) -> str:
        """The last extension in words (for the banner)."""
        before, at = self.previous.total_steps, self.extended_at
        return (f"planned for {before:,} steps, extended at step {at:,} to {self.total_steps:,}: the learning rate "
                f"eases from {self.previous.envelope(at):.2e} to the cosine planned for {self.total_steps:,} steps "
                f"over {self.warmup_steps} steps (training.warmup_steps)")

    def _cosine(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def restart_ramp(self, step: int) -> float:
        """The jagged part: 0 on the last step of every cycle (the step just before its merge moves no
        weights), then a linear ramp over restart_warmup steps back to the envelope.

        restart_warmup = 0 means no jag at all: no zero step and no ramp, the adapters train at the envelope's
        rate on every step of every cycle (as in the reference code, which zeroes a step only as the start of
        a positive re-warm-up). The first cycle ramps only when it follows a full-rank warm start; with no
        warm start the global warm-up already covers it.
        """
        if self.restart_every <= 0 or step < self.relora_start or self.restart_warmup <= 0:
            return 1.0
        if self.merges_after(step):
            return 0.0
        cycle, pos = divmod(step - self.relora_start, self.restart_every)
        if cycle == 0 and self.relora_start == 0:
            return 1.0
        return min(1.0, (pos + 1) / self.restart_warmup)

    def idle_cycles(self) -> list[tuple[int, int]]:
        """(first, last) step of every ReLoRA cycle in which no step gives the adapters a learning rate above
        zero: its adapters would be merged untrained (e.g. two-step cycles whose first step is the global
        warm-up's step 0 and whose second is the zero step before the merge)."""
        if self.restart_every <= 0:
            return []
        idle = []
        for first in range(self.relora_start, self.total_steps, self.restart_every):
            last = min(first + self.restart_every, self.total_steps) - 1
            if all(self(s) <= 0 for s in range(first, last + 1)):
                idle.append((first, last))
        return idle

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): the adapters' in the ReLoRA phase, every
        parameter's before it."""
        return self.envelope(step) * self.restart_ramp(step) * self.phase_ratio(step)

    def full_rate(self, step: int) -> float:
        """Learning rate of optimizer step `step` for the parameters that train in full in the ReLoRA phase
        (embeddings, norms, head; all of them before it): the envelope in every phase, so their rate never
        jumps at the switch (their own multiple of it, training.embedding_lr_ratio, is their parameter group's).
        With jagged_all they drop and re-warm at every restart like the adapters, at 1x."""
        if self.jagged_all and self.restart_every > 0 and step >= self.relora_start:
            return self.envelope(step) * self.restart_ramp(step)
        return self.envelope(step)

    def phase_ratio(self, step: int) -> float:
        """relora_lr_ratio in the ReLoRA phase, 1 in the full-rank warm start. After a warm start the first
        cycle ramps from zero (restart_ramp), so the change of rate at the switch is never a jump."""
        return self.relora_lr_ratio if self.restart_every > 0 and step >= self.relora_start else 1.0

    def merges_after(self, step: int) -> bool:
        """Whether adapters are merged right after optimizer step `step` (0-based): at the end of every
        cycle of the ReLoRA phase, the last one included, so a run ends with everything merged."""
        if self.restart_every <= 0 or step < self.relora_start:
            return False
        return (step + 1 - self.relora_start) % self.restart_every == 0
