"""Estimate against measurement on this machine: `qrelora memory`'s estimate next to real training steps.

    python tools/memory_check.py [--steps 4] [--tokenizer DIR] [--results benchmarks/RESULTS.md]

For the default recipe as written and for the 60M preset's shape (sequence 256, activation checkpointing,
gradient accumulation 2; with --tokenizer, a 32000-entry LLaMA tokenizer directory gives it the preset's
real vocabulary), the estimate (a fake-tensor run, nothing computed) is compared with `--steps`
real steps (half full-rank warm start, half ReLoRA ending in a merge) whose every tensor is tracked. Printed
and recorded: each moment's peak, and each category at each training phase's peak, with the error relative
to the measured peak of the run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SETTINGS = {
    "tiny.toml as written (micro-batch 16 x 128, no checkpointing)": [],
    "60M shape (hidden 512, 8 layers), micro-batch 8 x 256, checkpointing, accumulation 2":
        ["--model.preset=60m", "--data.seq_len=256", "--training.micro_batch_size=8", "--training.grad_accum=2",
         "--training.activation_checkpointing=true", "--relora.rank=128"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokenizer", help="tokenizer directory for the 60M setting (default: the built-in sample)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.memory import Estimator, category_comparison, comparison, measure, vocab_size_of

    quiet_dependencies()
    body = [f"Each setting: the estimate, then {args.steps} real CPU steps of the same recipe (half full-rank, "
            "half ReLoRA ending in a merge) with every tensor tracked. MiB; error = (estimated - measured) / "
            "measured peak of the run.", ""]
    for name, overrides in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            if args.tokenizer and "60m" in " ".join(overrides):
                overrides = overrides + [f"--data.tokenizer={args.tokenizer}"]
            recipe = load_recipe(ROOT / "recipes" / "tiny.toml", overrides + [f"--run.output_dir={tmp}"])
            vocab, _ = vocab_size_of(recipe)
            estimate = Estimator(recipe, vocab, 24 * 2**30).estimate()
            measured = measure(recipe, args.steps)
        rows = comparison(estimate, measured)
        worst = max(abs(r["error"]) for r in rows)
        lines = [f"### {name}", "", f"Vocabulary {vocab:,}; largest error {worst:.1%} of the measured peak.", "",
                 "| phase | moment | estimated | measured | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['moment']} | {r['estimated'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
                  f"{r['error']:+.1%} |" for r in rows]
        for phase, result in category_comparison(estimate, measured).items():
            lines += ["", f"{phase} phase, by category at its measured peak ({result['moment']}):", "",
                      "| category | estimated | measured | error |", "|---|---|---|---|"]
            lines += [f"| {c['category']} | {c['estimated'] / 2**20:.1f} | {c['measured'] / 2**20:.1f} | "
                      f"{c['error']:+.1%} |" for c in result["categories"]]
        print("\n".join(lines) + "\n", flush=True)
        body += lines + [""]
    from results import record

    record(Path(args.results), "Memory estimate against measured CPU steps",
           f"python tools/memory_check.py --steps {args.steps}" + (" --tokenizer DIR" if args.tokenizer else ""),
           f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores", body)


if __name__ == "__main__":
    main()
