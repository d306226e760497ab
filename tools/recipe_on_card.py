"""Run the 24 GB recipes as written on a GPU capped at 24 GiB, and report each phase next to the estimate.

    python tools/recipe_on_card.py --tokenizer DIR [--cap-gib 24] [recipes/1b3_24gb.toml recipes/7b_24gb.toml]
    python tools/recipe_on_card.py --dry-run     # the same plumbing on CPU with a tiny shape (tested)
    python tools/recipe_on_card.py --cpu recipes/7b_24gb.toml   # the recipe's real model on the CPU: times only

Each recipe runs in its own process with its own micro-batch, accumulation, checkpointing, optimizer and
storage format; only the length changes: `--warm-steps` full-rank steps when the recipe has a warm start (the
7B recipe starts in NF4, built from the meta device layer by layer), the switch, one ReLoRA cycle of
`--cycle-steps` steps ending in a merge, and a checkpoint. The data is the built-in sample text tokenized with
`--tokenizer` (the GPU machine reaches no hub; a 32000-entry LLaMA-style tokenizer has the vocabulary of the
recipes' t5-base within 100 entries). `torch.cuda.set_per_process_memory_fraction` makes the allocator fail
past the cap, as a card of that size would; memory outside the allocator (CUDA context, paged optimizer
states) does not count against that limit, so it is reported and added to the reserved peak for the verdict.
Reported per phase: wall time, tokens/s, peak allocated and reserved, and the estimate of `qrelora memory`.

`--cpu` runs the recipe's own model shape, storage and merges on the CPU with one micro-batch of 64 tokens
and torch's AdamW: no memory verdict, but the time of each part that does not depend on the batch (the
build from the meta device with its master copy written to disk, the merge, the checkpoint) for a model
too big to try on a card without knowing where its time goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

GiB = 2**30
RECIPES = ["recipes/1b3_24gb.toml", "recipes/7b_24gb.toml"]
DRY_RUN = ["--model.preset=custom", "--model.hidden_size=128", "--model.num_layers=2", "--model.num_heads=4",
           "--model.mlp_size=256", "--data.seq_len=64", "--training.micro_batch_size=4", "--training.device=cpu",
           "--data.tokenizer=sample", "--relora.rank=8", "--optim.name=adamw"]
ON_CPU = ["--training.device=cpu", "--training.micro_batch_size=1", "--training.grad_accum=1", "--data.seq_len=64",
          "--optim.name=adamw"]


def child(recipe_path: str, overrides: list[str], warm_steps: int, cycle_steps: int, cap_gib: float) -> dict:
    import torch

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.memory import Estimator
    from qrelora.monitor import PlainLog
    from qrelora.train import Trainer

    quiet_dependencies()
    shape = load_recipe(recipe_path, overrides)
    cuda = shape.training.device == "cuda"
    if cuda:  # before the first allocation
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / torch.cuda.get_device_properties(0).total_memory))
    warm = warm_steps if shape.relora.enabled and shape.relora.warm_start_steps else 0
    steps = warm + cycle_steps
    one_batch = shape.data.seq_len * shape.training.micro_batch_size
    recipe = load_recipe(recipe_path, [*overrides, f"--training.steps={steps}", "--training.warmup_steps=1",
                                       f"--relora.warm_start_steps={warm}", f"--relora.restart_every={cycle_steps}",
                                       f"--relora.restart_warmup={1 if warm else 0}", "--training.eval_every=0",
                                       f"--data.eval_tokens={one_batch}", "--checkpoint.every=0",
                                       "--checkpoint.resume=never"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases: dict[str, dict] = {}
    began = time.perf_counter()

    def progress(what: str) -> None:  # on stderr, so that a run cut by the timeout still shows where time went
        print(f"[{time.perf_counter() - began:7.1f} s] {what}", file=sys.stderr, flush=True)

    def memory() -> dict:
        if not cuda:
            return {}
        return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}

    def begin():
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    t0 = begin()
    trainer = Trainer(recipe, PlainLog(io.StringIO()))
    sync()
    phases["build"] = {"seconds": time.perf_counter() - t0, **memory()}
    progress(f"built: {phases['build']}")
    estimate = Estimator(recipe, len(trainer.tokenizer), int(cap_gib * GiB)).estimate(compare_checkpointing=False)
    needs = {("full-rank" if p.name.startswith("full-rank") else "ReLoRA"): p.need for p in estimate.phases}
    try:
        timed = {"full-rank": [], "ReLoRA": []}
        merge_s = switch_s = 0.0
        start = begin()
        while trainer.state.step < steps:
            phase = "ReLoRA" if trainer.relora.active or trainer.relora.switch_due(trainer.state.step) else "full-rank"
            if phase == "ReLoRA" and phases.get("full-rank") is None and warm:
                phases["full-rank"] = {**memory()}
                start = begin()
            if trainer.relora.switch_due(trainer.state.step):
                t = time.perf_counter()
                trainer.switch_to_relora()
                sync()
                switch_s = time.perf_counter() - t
                progress(f"switched to ReLoRA in {switch_s:.1f} s")
            merging = trainer.schedule.merges_after(trainer.state.step)
            t = time.perf_counter()
            record = trainer.step()
            sync()
            seconds = time.perf_counter() - t
            if merging:
                merge_s = seconds - record.seconds
            timed[phase].append(record.seconds)
            progress(f"step {trainer.state.step} ({phase}): {record.seconds:.1f} s" + (f", merge {merge_s:.1f} s" if merging else ""))
        phases["ReLoRA"] = {**memory(), "merge_s": merge_s, "switch_s": switch_s}
        t = begin()
        saved = trainer.save_checkpoint()
        sync()
        phases["checkpoint"] = {"seconds": time.perf_counter() - t, **memory(),
                                "disk_bytes": sum(f.stat().st_size for f in saved.iterdir())}
        progress(f"checkpoint saved in {phases['checkpoint']['seconds']:.1f} s")
        outside = float("nan")
        if cuda:
            free, total = torch.cuda.mem_get_info()
            outside = total - free - torch.cuda.memory_reserved()
    finally:
        trainer.close()
    for name, secs in timed.items():
        if secs and name in phases:
            later = secs[1:] or secs  # the first step of a phase pays for lazy initialisation
            phases[name]["tokens_per_s"] = recipe.tokens_per_step / statistics.median(later)
            phases[name]["estimate"] = needs.get(name)
    return {"phases": phases, "outside_allocator": outside, "tokens_per_step": recipe.tokens_per_step,
            "micro_batch_size": recipe.training.micro_batch_size, "grad_accum": recipe.training.grad_accum,
            "cycle_steps": cycle_steps, "warm_steps": warm}


def gib(n) -> str:
    return "" if n is None or n != n else f"{n / GiB:.2f}"


def table(name: str, r: dict, cap_gib: float) -> list[str]:
    """The per-phase table; times only when nothing measured memory (the CPU)."""
    memory = any("peak_allocated" in p for p in r["phases"].values())
    outside = r["outside_allocator"] if r["outside_allocator"] == r["outside_allocator"] else 0
    intro = (f"**{name}**: micro-batch {r['micro_batch_size']} x accumulation {r['grad_accum']} "
             f"({r['tokens_per_step']:,} tokens per step), {r['warm_steps']} warm-start steps, one cycle of "
             f"{r['cycle_steps']} steps, a merge and a checkpoint")
    columns = ["phase", "time", "tokens/s"]
    if memory:
        intro += f"; memory outside the allocator {gib(r['outside_allocator'])} GiB"
        columns += ["peak allocated (GiB)", "estimated (GiB)", "peak reserved + outside (GiB)", f"fits {cap_gib:g} GiB"]
    rows = [intro + ".", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for phase in ("build", "full-rank", "ReLoRA", "checkpoint"):
        p = r["phases"].get(phase)
        if p is None:
            continue
        time_s = (f"{p['seconds']:.1f} s" if "seconds" in p
                  else f"merge {p['merge_s']:.1f} s, switch {p['switch_s']:.1f} s" if "merge_s" in p else "")
        time_s += f" ({gib(p['disk_bytes'])} GiB on disk)" if "disk_bytes" in p else ""
        cells = [phase, time_s, f"{p['tokens_per_s']:,.0f}" if "tokens_per_s" in p else ""]
        if memory:
            held = p.get("peak_reserved", 0) + outside if "peak_reserved" in p else None
            verdict = "" if held is None else "yes" if held <= cap_gib * GiB else "**no**"
            cells += [gib(p.get("peak_allocated")), gib(p.get("estimate")), gib(held), verdict]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="*", default=RECIPES)
    ap.add_argument("--tokenizer", default="", help="a local tokenizer directory (the GPU machine has no hub)")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--warm-steps", type=int, default=2)
    ap.add_argument("--cycle-steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per recipe before its run is stopped")
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape on CPU: checks the plumbing only")
    ap.add_argument("--cpu", action="store_true", help="the recipe's own shape on the CPU, one 64-token micro-batch: "
                                                       "times of build, step, merge and checkpoint")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(spec["recipe"], spec["overrides"], args.warm_steps, args.cycle_steps,
                                           args.cap_gib)), flush=True)
        return
    body = []
    for recipe in args.recipes:
        # Each recipe's run (checkpoint, the 7B's 24 GiB master file) is removed once measured: the two would
        # not fit a 64 GiB disk together.
        run_dir = Path(tempfile.gettempdir()) / f"qrelora_card_{Path(recipe).stem}"
        overrides = ["--data.dataset=sample", f"--run.output_dir={run_dir}"]
        overrides += [f"--data.tokenizer={args.tokenizer}"] if args.tokenizer else []
        overrides += DRY_RUN if args.dry_run else ON_CPU if args.cpu else []
        cmd = [sys.executable, __file__, "--child", json.dumps({"recipe": str(ROOT / recipe), "overrides": overrides}),
               "--warm-steps", str(args.warm_steps), "--cycle-steps", str(args.cycle_steps), "--cap-gib", str(args.cap_gib)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            proc = subprocess.CompletedProcess(cmd, f"timed out after {args.timeout:g} s", "", err)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            print(f"{recipe}: failed (exit {proc.returncode}) after {time.perf_counter() - t0:.0f} s\n{tail}", flush=True)
            body += [f"**{recipe}**: failed (exit {proc.returncode}): `{tail.splitlines()[-1] if tail else ''}`", ""]
            continue
        rows = table(recipe, json.loads(lines[-1][7:]), args.cap_gib)
        print("\n".join(rows), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
        body += rows + [""]
    if args.dry_run:
        return
    import torch

    from results import record

    if args.cpu:
        card = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        record(Path(args.results), "24 GB recipes' models on the CPU (one 64-token micro-batch): where the time goes",
               f"python tools/recipe_on_card.py --cpu{' --tokenizer DIR' if args.tokenizer else ''} "
               f"{' '.join(args.recipes)}", card, body)
        return
    card = torch.cuda.get_device_name()
    record(Path(args.results), f"24 GB recipes as written, capped at {args.cap_gib:g} GiB on {card}",
           f"python tools/recipe_on_card.py --tokenizer DIR --cap-gib {args.cap_gib:g}", card, body)


if __name__ == "__main__":
    main()
