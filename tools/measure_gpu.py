"""Measure a big recipe on the GPU: peak memory and throughput of ReLoRA next to a full-rank baseline.

    python tools/measure_gpu.py --tokenizer DIR [--recipe recipes/1b3_24gb.toml] [--steps 20] [--with-7b]
    python tools/measure_gpu.py --dry-run          # the same plumbing on CPU with a tiny model (tested)

Each variant runs `--steps` optimizer steps of the recipe (one micro-batch per step, merges every
steps/2, so two merges) in its own process, on the built-in sample text tokenized with --tokenizer (a
32000-entry LLaMA-style tokenizer stands in for t5-base when the hub is out of reach; the vocabulary, not
the text, sets the logits' size). Reported: CUDA peak allocated and reserved, tokens/s over the steps
after the first three (merge steps excluded), and merge time, next to `qrelora memory`'s estimate of the
allocated peak for the same recipe, and the device memory used outside torch's allocator (CUDA context,
paged optimizer states), which the estimate assumes. The baseline trains the same shape and micro-batch
full-rank (fp32 weights, bf16 autocast, 8-bit AdamW, activation checkpointing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DRY_RUN = ["--model.preset=custom", "--model.hidden_size=128", "--model.num_layers=2", "--model.num_heads=4",
           "--model.mlp_size=256", "--data.seq_len=64", "--training.micro_batch_size=4", "--training.device=cpu",
           "--data.tokenizer=sample", "--relora.rank=8"]


def variants(with_7b: bool) -> dict[str, list[str]]:
    v = {
        "ReLoRA, NF4 base (recipe as written)": [],
        "full-rank, bf16 autocast + 8-bit AdamW": ["--relora.enabled=false", "--optim.name=adamw8bit"],
    }
    if with_7b:
        v["ReLoRA, NF4 base, 7B shape"] = ["--model.preset=7b"]
    return v


def child(args) -> None:
    """Run one variant in this process and print one JSON line with what was measured."""
    import torch

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.monitor import PlainLog, memory_gib
    from qrelora.train import Trainer

    quiet_dependencies()
    steps = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"--run.output_dir={tmp}", f"--training.steps={steps}", "--training.warmup_steps=2",
                     "--training.grad_accum=1", "--training.log_every=1", "--training.eval_every=0",
                     "--relora.warm_start_steps=0", f"--relora.restart_every={steps // 2}",
                     "--relora.restart_warmup=2", "--data.dataset=sample", "--checkpoint.every=0"]
        if args.tokenizer:
            overrides.append(f"--data.tokenizer={args.tokenizer}")
        overrides += (DRY_RUN if args.dry_run else []) + json.loads(args.child)
        shape = load_recipe(args.recipe, overrides)
        one_batch = shape.data.seq_len * shape.training.micro_batch_size  # evaluation is not what is measured
        recipe = load_recipe(args.recipe, overrides + [f"--data.eval_tokens={one_batch}"])
        t0 = time.perf_counter()
        trainer = Trainer(recipe, PlainLog(sys.stderr))
        build_s = time.perf_counter() - t0
        cuda = torch.cuda.is_available() and recipe.training.device != "cpu"
        if cuda:
            # Building may pass through the fp32 model when it fits the card; training peaks are measured
            # from here on, the build's peak is reported apart.
            build_peak_gib = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        trainer.run()
        outside_gib = float("nan")
        if cuda:
            free, total = torch.cuda.mem_get_info()
            outside_gib = (total - free - torch.cuda.memory_reserved()) / 2**30
        records = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        from qrelora.memory import Estimator

        estimate = Estimator(recipe, len(trainer.tokenizer), 24 * 2**30).estimate(compare_checkpointing=False)
        estimated_gib = max(p.tensor_bytes(m) for p in estimate.phases for m in p.parts) / 2**30
    merge_steps = {r["step"] for r in records if r.get("event") == "merge"}
    rates = [r["tokens_per_s"] for r in records
             if "tokens_per_s" in r and r["step"] > 3 and r["step"] not in merge_steps]
    result = {
        "micro_batch_size": recipe.training.micro_batch_size, "seq_len": recipe.data.seq_len,
        "tokens_per_s": statistics.median(rates) if rates else float("nan"),
        "merge_s": max([r["merge_s"] for r in records if r.get("event") == "merge"], default=0.0),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else memory_gib(torch.device("cpu")),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        "build_s": build_s,
        "build_peak_gib": build_peak_gib if cuda else float("nan"),
        "estimated_allocated_gib": estimated_gib,
        "outside_allocator_gib": outside_gib,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "1b3_24gb.toml"))
    ap.add_argument("--tokenizer", default="", help="local tokenizer directory (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--with-7b", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only the variants whose name contains one of these")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the plumbing only")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args)

    rows = []
    for name, overrides in variants(args.with_7b).items():
        if args.only and not any(o in name for o in args.only):
            continue
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps),
               "--child", json.dumps(overrides)] + (["--tokenizer", args.tokenizer] if args.tokenizer else []) + \
              (["--dry-run"] if args.dry_run else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            print(f"{name}: failed (exit {proc.returncode})\n{tail}", flush=True)
            rows.append((name, None))
            continue
        r = json.loads(lines[-1][7:])
        r["wall_s"] = time.perf_counter() - t0
        rows.append((name, r))
        print(f"{name}: {json.dumps(r)}", flush=True)

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    table = ["| run | micro-batch x seq | peak allocated (training) | estimated allocated | peak reserved "
             "| outside torch's allocator | tokens/s | slowest merge | build time (peak) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if r is None:
            table.append(f"| {name} | failed | | | | | | | |")
            continue
        table.append(f"| {name} | {r['micro_batch_size']} x {r['seq_len']} | {r['peak_allocated_gib']:.2f} GiB | "
                     f"{r['estimated_allocated_gib']:.2f} GiB | {r['peak_reserved_gib']:.2f} GiB | "
                     f"{r['outside_allocator_gib']:.2f} GiB | {r['tokens_per_s']:,.0f} | {r['merge_s']:.2f} s | "
                     f"{r['build_s']:.0f} s ({r['build_peak_gib']:.1f} GiB) |")
    print("\n".join(table))
    if args.dry_run:
        return
    from results import record

    heading = f"{Path(args.recipe).name} measured on {card}" + (f" ({', '.join(args.only)})" if args.only else "")
    command = (f"python tools/measure_gpu.py --tokenizer DIR --steps {args.steps}"
               f"{' --with-7b' if args.with_7b else ''}{' --only ' + ' '.join(args.only) if args.only else ''}")
    record(Path(args.results), heading, command, card, [
        f"{args.steps} steps per run, merges every {args.steps // 2}, sample text, 32000-entry tokenizer.", "",
        *table])


if __name__ == "__main__":
    main()
