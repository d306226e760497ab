"""What the memory tool says: sizes read (`parse_bytes`) and written, the estimate next to a measurement
(`comparison`, `category_comparison`), the tables of `qrelora memory` (`render`, `render_measurement`) and
the change to make to a recipe that does not fit (`fix_for`).
"""

from __future__ import annotations

import re

from rich.table import Table

from ..config import Recipe
from .estimate import ALLOCATOR_RESERVE, DEVICE_CATEGORIES, HOST_CATEGORIES, GiB, Estimate
from .measurement import MOMENTS, Measurement

# --------------------------------------------------------------------------------------------------
# Sizes, read and written

MiB = 2**20


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '20000MiB', '1.5T' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size: write it like 24GiB, 24GB or 20000MiB")
    number, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not prefix:
        return int(number)
    return int(number * (1024 if binary else 1000) ** ("KMGT".index(prefix) + 1))


def _unit(largest: int) -> tuple[int, str]:
    return (GiB, "GiB") if largest >= GiB else (MiB, "MiB")


def _fmt(n: int | None, unit: int) -> str:
    return "" if n is None else f"{n / unit:.2f}"


# --------------------------------------------------------------------------------------------------
# Estimate against measurement


def comparison(e: Estimate, m: Measurement) -> list[dict]:
    """Estimated next to measured bytes for every measured moment; the error is relative to the measured
    peak of the run (the figure a budget is about)."""
    top = max(v for d in m.peaks.values() for v in d.values())
    rows = []
    for phase, moments in m.peaks.items():
        est_phase = next(p for p in e.phases if p.name.startswith(phase))
        for moment in MOMENTS:
            if moment not in moments:
                continue
            host = sum(v for k, v in m.categories.get(phase, {}).get(moment, {}).items() if k in HOST_CATEGORIES)
            measured = moments[moment] - host
            estimated = est_phase.tensor_bytes(moment)
            rows.append({"phase": phase, "moment": moment, "estimated": estimated, "measured": measured,
                         "reserved": m.reserved.get(phase, {}).get(moment),
                         "error": (estimated - measured) / top})
    return rows


def category_comparison(e: Estimate, m: Measurement) -> dict[str, dict]:
    """CPU measurements: for each training phase, estimated and measured bytes by category at the phase's
    measured peak moment, with the error relative to the run's measured peak."""
    top = max(v for d in m.peaks.values() for v in d.values())
    out = {}
    for phase, moments in m.peaks.items():
        moment = max(moments, key=moments.get)
        est_phase = next(p for p in e.phases if p.name.startswith(phase))
        est = est_phase.after_build if moment == "after build" else est_phase.parts[moment]
        meas = m.categories.get(phase, {}).get(moment, {})
        names = [c for c in DEVICE_CATEGORIES if est.get(c) or meas.get(c)]
        names += [c for c in HOST_CATEGORIES if meas.get(c)]
        rows = []
        for c in names:
            estimated = est.get(c, est_phase.host.get(c, 0))
            rows.append({"category": c, "estimated": estimated, "measured": meas.get(c, 0),
                         "error": (estimated - meas.get(c, 0)) / top})
        out[phase] = {"moment": moment, "categories": rows}
    return out


# --------------------------------------------------------------------------------------------------
# The tables of `qrelora memory`

NOTES = {
    "frozen weights": "codes and block scales of the frozen linears",
    "adapters": "A and B of every adapted linear, fp32",
    "full-rank weights": "embeddings, norms, head (all weights when full-rank), fp32",
    "gradients": "fp32, one per trainable weight",
    "activations": "saved for backward, and temporaries",
    "logits and loss": "LM head logits, one chunk of tokens at a time: 16-bit, fp32, turned gradient",
    "optimizer step workspace": "temporaries of the optimizer step",
    "merge workspace": "merging the largest layer (one layer at a time)",
    "build workspace": "initialising and quantizing the largest layer (built layer by layer)",
    "allocator reserve": f"{ALLOCATOR_RESERVE:.0%} of allocated (measured reserved/allocated ratio)",
    "CUDA context": "assumed: driver state, loaded code, cuBLAS workspace",
    "master copy": "fp32 master of every frozen weight (exact merges)",
    "residual": "bf16 rounding residual (error-feedback merges)",
    "rank-probe copies": "three layers' starting weights (effective-rank report)",
    "fp32 model while building": "the model is initialised in host memory, then quantized layer by layer",
    "reading init_from": "the checkpoint's largest tensor as stored plus an fp32 copy (read one at a time)",
}


def render(e: Estimate, largest: int, m: Measurement | None, console) -> None:
    r_cpu = e.device_type == "cpu"
    console.print(f"[bold]qrelora memory[/] {e.recipe}")
    console.print(f"{e.device_type}, micro-batch {e.micro_batch_size} x {e.seq_len} tokens, vocabulary "
                  f"{e.vocab_size:,} ({e.vocab_source}), optimizer {e.optimizer}, activation checkpointing "
                  f"{'on' if e.checkpointing else 'off'}"
                  + (" (off in the ReLoRA phase)" if e.checkpointing and not e.phases[-1].checkpointing else ""))
    unit, unit_name = _unit(e.need)

    def _gib(n: int | None) -> str:
        return _fmt(n, unit)

    table = Table(title=f"{unit_name} at each phase's peak moment; (x) = at another moment, not in the peak",
                  title_justify="left")
    table.add_column("device")
    for p in e.phases:
        table.add_column(p.name.replace(" (", "\n("), justify="right")
    table.add_column("what", style="dim")
    for c in DEVICE_CATEGORIES:
        cells = []
        for p in e.phases:
            if c in p.device:
                cells.append(_gib(p.device[c]))
            elif p.workspaces.get(c) or any(parts.get(c) for parts in p.parts.values()):
                other = max(parts.get(c, 0) for parts in p.parts.values())
                cells.append(f"({_gib(p.workspaces.get(c) or other)})")
            else:
                cells.append("")
        if any(cells):
            note = NOTES.get(c, "")
            if c == "optimizer states":
                note = e.optimizer + (" (paged: can spill to host memory)" if e.optimizer.startswith("paged") else "")
            table.add_row(c, *cells, note)
    flipped = [f"({_gib(p.activations[not p.checkpointing])}, {'off' if p.checkpointing else 'on'})"
               if (not p.checkpointing) in p.activations else "" for p in e.phases]
    table.add_row("activations + logits, checkpointing switched", *flipped, "the other setting, for comparison")
    table.add_row("[bold]device peak", *[f"[bold]{_gib(p.need)}" for p in e.phases], "")
    table.add_row("  at", *[p.peak_moment for p in e.phases], "")
    for c in sorted({k for p in e.phases for k in p.host}):
        table.add_row(f"host: {c}", *[_gib(p.host.get(c)) for p in e.phases], NOTES.get(c.split(" (")[0], ""))
    if console.width < 120:  # the notes would wrap every row into three to six lines
        table.columns.pop()
        table.caption, table.caption_justify = "120 columns or more also show what each row holds", "left"
    console.print(table)
    worst = max(e.phases, key=lambda p: p.need)
    verdict = (f"[green]fits[/], headroom {1 - e.need / e.budget:.0%}" if e.fits else
               f"[red]does NOT fit[/], {(e.need - e.budget) / GiB:.2f} GiB over")
    what = "device + host memory" if r_cpu else "device memory"
    console.print(f"Needs {e.need / GiB:.2f} GiB of {what} (peak: the {worst.peak_moment} of the "
                  f"{worst.name.split(' (')[0]} phase); budget {e.budget / GiB:.2f} GiB: {verdict}.")
    released = max(p.released_at_switch for p in e.phases)
    if released:
        console.print(f"At the switch to ReLoRA the warm start's optimizer states of the replaced linears are freed: "
                      f"{released / GiB:.2f} GiB" + (" (paged: handed back to the CUDA driver explicitly, as "
                                                     "bitsandbytes never frees them)." if e.optimizer.startswith("paged")
                                                     else "."))
    master = e.master_on_disk
    if not r_cpu:
        console.print(f"Host memory (tensors): {e.host_need / GiB:.2f} GiB.")
    console.print(f"Disk: {e.disk_need / GiB:.2f} GiB ({e.checkpoints_at_once} checkpoint"
                  f"{'s' if e.checkpoints_at_once > 1 else ''} of up to {e.checkpoint_bytes / GiB:.2f} GiB at once"
                  + (f", and {master / GiB:.2f} GiB for the memory-mapped master copy)." if master else ")."))
    console.print(f"Largest micro-batch that fits {e.budget / GiB:.2f} GiB: "
                  + (f"[bold]{largest}[/] x {e.seq_len} tokens (the recipe has {e.micro_batch_size})." if largest
                     else "none: even one sequence does not fit; see the categories above."))
    console.print(f"[dim]Estimated in {e.seconds:.0f} s by running one micro-batch of the real model on fake tensors."
                  + (" CUDA context assumed; measure on the card with --measure 20." if not r_cpu else "") + "[/]")
    if m is not None:
        render_measurement(e, m, console)


def render_measurement(e: Estimate, m: Measurement, console) -> None:
    cuda = m.device_type == "cuda"
    unit, unit_name = _unit(max(v for d in m.peaks.values() for v in d.values()))
    source = "torch.cuda peak allocated" if cuda else "live tensor bytes"
    table = Table(title=f"Measured over {m.steps} real steps ({source}), {unit_name}; error relative to the "
                        "measured peak", title_justify="left")
    for col in ["phase", "moment", "estimated", "measured"] + (["reserved"] if cuda else []) + ["error"]:
        table.add_column(col, justify="left" if col in ("phase", "moment") else "right")
    for row in comparison(e, m):
        table.add_row(row["phase"], row["moment"], _fmt(row["estimated"], unit), _fmt(row["measured"], unit),
                      *([_fmt(row["reserved"], unit)] if cuda else []), f"{row['error']:+.1%}")
    console.print(table)
    if not cuda:
        for phase, result in category_comparison(e, m).items():
            t = Table(title=f"By category at the {phase} phase's measured peak ({result['moment']}), {unit_name}",
                      title_justify="left")
            for col in ("category", "estimated", "measured", "error"):
                t.add_column(col, justify="left" if col == "category" else "right")
            for row in result["categories"]:
                t.add_row(row["category"], _fmt(row["estimated"], unit), _fmt(row["measured"], unit),
                          f"{row['error']:+.1%}")
            console.print(t)
    console.print(f"{m.tokens_per_s:,.0f} tokens/s over the steps after the first (measurement overhead included)."
                  + (f" Memory snapshot: {m.snapshot} (open it at https://pytorch.org/memory_viz)."
                     if m.snapshot else ""))


# --------------------------------------------------------------------------------------------------
# What to change


def fix_for(recipe: Recipe, largest: int | None = None) -> str:
    """A concrete change to a recipe that ran out of device memory."""
    t = recipe.training
    if largest == 0:
        return ("Not even a micro-batch of one sequence fits: choose a smaller model (model.preset), a smaller "
                "relora.rank or a shorter data.seq_len"
                + (", or turn on activation checkpointing (--training.activation_checkpointing=true)"
                   if not t.activation_checkpointing else "") + ".")
    if largest and largest < t.micro_batch_size:
        per_step = t.micro_batch_size * t.grad_accum
        micro = max(d for d in range(1, largest + 1) if per_step % d == 0)
        if 2 * micro > largest:
            return (f"Lower the micro-batch to what fits and keep the {per_step} sequences per step with "
                    f"accumulation: --training.micro_batch_size={micro} --training.grad_accum={per_step // micro}.")
        accum = -(-per_step // largest)
        return (f"Lower the micro-batch to what fits and keep about the same sequences per step with accumulation: "
                f"--training.micro_batch_size={largest} --training.grad_accum={accum} ({largest * accum} sequences "
                f"per step instead of {per_step}).")
    if not t.activation_checkpointing:
        return "Turn on activation checkpointing: --training.activation_checkpointing=true."
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        return (f"Halve the micro-batch and double the accumulation: --training.micro_batch_size={half} "
                f"--training.grad_accum={t.grad_accum * 2}.")
    return "Use fewer bits for the frozen weights (--quant.bits=4), a smaller rank, or a shorter seq_len."


def render_fit(recipe_name: str, found, budget: int, measured_steps: int, console) -> None:
    """The --fit table and the overrides of the winner (found: fit.Candidate list, best first)."""
    table = Table(title=f"Configurations of {recipe_name} at the same tokens per step, best first, budget "
                        f"{budget / GiB:.2f} GiB", title_justify="left")
    for col in ("activation checkpointing", "micro-batch x accumulation", "estimated peak", "fits") + (
            (f"tokens/s ({measured_steps} steps)",) if measured_steps else ()):
        table.add_column(col, justify="left" if col.startswith("activation") else "right")
    for c in found:
        shape = f"{c.micro_batch_size} x {c.grad_accum}" if c.micro_batch_size else "not even 1 sequence"
        speed = ((f"{c.tokens_per_s:,.0f}" if c.tokens_per_s else "-"),) if measured_steps else ()
        table.add_row(c.checkpointing, shape, f"{c.need / GiB:.2f} GiB" if c.need else "-",
                      "yes" if c.fits else f"no{': ' + c.note if c.note else ''}", *speed)
    console.print(table)
    best = found[0]
    if best.fits:
        why = "the highest measured tokens/s" if measured_steps else (
            "estimate only: fewest recomputed forwards first, then the biggest micro-batch; add --measure STEPS to "
            "time them")
        console.print(f"use: qrelora train {recipe_name} {' '.join(best.overrides())}  ({why})")
    else:
        console.print(f"nothing fits {budget / GiB:.2f} GiB at this model shape and sequence length: choose a smaller "
                      "model (model.preset), 4-bit frozen weights (--quant.bits=4), a smaller relora.rank or a shorter "
                      "data.seq_len, or a bigger --budget")
