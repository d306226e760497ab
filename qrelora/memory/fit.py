"""`qrelora memory RECIPE --fit`: the fastest configuration of a recipe that fits a memory budget.

The candidates keep the recipe's tokens per optimizer step (micro_batch_size x grad_accum sequences) and vary
what only changes speed and memory: activation checkpointing (per decoder block) off, on, or on in the
full-rank warm start only, and for each, the largest micro-batch that the estimate says fits and that divides
the sequences per step. Without a measurement, fewer recomputed forwards rank first (off, then warm start
only, then on), then bigger micro-batches (the same arithmetic in fewer, larger kernels). With
`measure_steps`, every candidate that fits runs that many real steps and the highest tokens/s wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import Recipe
from .estimate import Estimate, Estimator


@dataclass
class Candidate:
    checkpointing: str
    """"off", "warm start only" or "on"."""
    micro_batch_size: int
    grad_accum: int
    need: int
    """Estimated peak bytes against the budget (0 when not even one sequence fits)."""
    fits: bool
    tokens_per_s: float | None = None
    note: str = ""

    def overrides(self) -> list[str]:
        return [f"--training.micro_batch_size={self.micro_batch_size}", f"--training.grad_accum={self.grad_accum}",
                f"--training.activation_checkpointing={'false' if self.checkpointing == 'off' else 'true'}",
                f"--relora.activation_checkpointing={'true' if self.checkpointing == 'on' else 'false'}"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"overrides": self.overrides()}


SETTINGS = ("off", "warm start only", "on")  # fewest recomputed forwards first


def with_setting(recipe: Recipe, checkpointing: str, micro_batch: int, grad_accum: int) -> Recipe:
    t = dataclasses.replace(recipe.training, activation_checkpointing=checkpointing != "off",
                            micro_batch_size=micro_batch, grad_accum=grad_accum)
    rl = dataclasses.replace(recipe.relora, activation_checkpointing=checkpointing == "on")
    return dataclasses.replace(recipe, training=t, relora=rl)


def candidates(recipe: Recipe, vocab_size: int, budget: int) -> list[Candidate]:
    """One candidate per checkpointing setting, best first by the estimate alone ("warm start only" when the
    recipe has a full-rank warm start and a ReLoRA phase)."""
    per_step = recipe.training.micro_batch_size * recipe.training.grad_accum
    both_phases = recipe.relora.enabled and recipe.relora.warm_start_steps > 0
    found, simulators = [], {}  # the settings share each phase's fake model for each checkpointing setting
    for checkpointing in SETTINGS:
        if checkpointing == "warm start only" and not both_phases:
            continue
        r = with_setting(recipe, checkpointing, recipe.training.micro_batch_size, recipe.training.grad_accum)
        estimator = Estimator(r, vocab_size, budget, simulators=simulators)
        largest = estimator.largest_micro_batch(estimator.estimate(compare_checkpointing=False))
        if largest == 0:
            found.append(Candidate(checkpointing, 0, 0, 0, False))
            continue
        micro = max(d for d in range(1, min(largest, per_step) + 1) if per_step % d == 0)
        estimate: Estimate = estimator.estimate(micro, compare_checkpointing=False)
        found.append(Candidate(checkpointing, micro, per_step // micro, estimate.need, estimate.fits))
    return sorted(found, key=lambda c: (not c.fits, SETTINGS.index(c.checkpointing), -c.micro_batch_size))


def fit(recipe: Recipe, vocab_size: int, budget: int, measure_steps: int = 0, log=None) -> list[Candidate]:
    """The candidates, best first: by measured tokens/s when `measure_steps`, else by the estimate's rule."""
    found = candidates(recipe, vocab_size, budget)
    if not measure_steps:
        return found
    import torch

    from .measurement import measure

    for c in found:
        if c.fits:
            r = with_setting(recipe, c.checkpointing, c.micro_batch_size, c.grad_accum)
            try:
                c.tokens_per_s = measure(r, measure_steps, log).tokens_per_s
            except torch.OutOfMemoryError:  # the estimate was optimistic for this one
                c.fits, c.note = False, "out of memory when measured"
                torch.cuda.empty_cache()
    return sorted(found, key=lambda c: (not c.fits, -(c.tokens_per_s or 0.0)))
