"""Does ReLoRA learn like full-rank training? Five runs of one tiny model at equal token budget and seed.

    python tools/learning_check.py [--only NAME ...] [--section.key=value ...] [--results FILE]

Runs recipes/tiny.toml (Shakespeare sample, ~7.4M-parameter LLaMA, warm start then rank-32 ReLoRA) as:
full-rank AdamW; LoRA without restarts (same warm start, one long cycle); ReLoRA with a 16-bit base;
ReLoRA with an NF4 base and exact merges; ReLoRA with an NF4 base and naive (in-place) requantization.
Prints a table of final eval loss and perplexity and writes it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import record  # noqa: E402  (tools/ is on sys.path when run as a script)

from qrelora.cli import quiet_dependencies  # noqa: E402
from qrelora.config import load_recipe  # noqa: E402
from qrelora.monitor import PlainLog  # noqa: E402
from qrelora.train import Trainer  # noqa: E402


def variants(steps: int, warm: int) -> dict[str, list[str]]:
    relora_steps = steps - warm
    return {
        "full-rank AdamW": ["--relora.enabled=false"],
        "LoRA, no restarts": ["--quant.bits=16", f"--relora.restart_every={relora_steps}"],
        "ReLoRA, 16-bit base": ["--quant.bits=16"],
        "ReLoRA, NF4 base, exact merge": ["--quant.bits=4", "--quant.merge=exact"],
        "ReLoRA, NF4 base, naive merge": ["--quant.bits=4", "--quant.merge=naive"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.toml"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--only", nargs="*", help="run only the named variants (substring match)")
    # Any --section.key=value argument is a recipe override applied to every variant.
    args, args.set = ap.parse_known_args()
    quiet_dependencies()
    base = load_recipe(args.recipe, args.set)
    steps, warm = base.training.steps, base.relora.warm_start_steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants(steps, warm).items():
            if args.only and not any(o in name for o in args.only):
                continue
            recipe = load_recipe(args.recipe, [f"--run.output_dir={Path(tmp) / str(len(rows))}", *args.set,
                                               *overrides])
            result = Trainer(recipe, PlainLog(io.StringIO())).run()
            rows.append((name, result["last_eval_loss"]))
            print(f"{name:32s} eval loss {rows[-1][1]:.4f}  ppl {math.exp(rows[-1][1]):8.2f}", flush=True)
    reference = dict(rows).get("ReLoRA, 16-bit base")
    table = ["| run | final eval loss | perplexity | vs 16-bit ReLoRA |", "|---|---|---|---|"]
    for name, loss in rows:
        rel = f"{(loss - reference) / reference:+.2%}" if reference else "-"
        table.append(f"| {name} | {loss:.4f} | {math.exp(loss):.2f} | {rel} |")
    print("\n".join(table))
    heading = "Learning check: full-rank vs LoRA vs ReLoRA (tiny model, Shakespeare)" + \
        (f", {' '.join(args.set)}" if args.set else "")
    command = "python tools/learning_check.py" + "".join(f" {o}" for o in args.set) + \
        ("" if not args.only else " --only " + " ".join(repr(o) for o in args.only))
    record(Path(args.results), heading, command, f"CPU ({platform.machine()}, {os.cpu_count()} cores)", [
        f"recipes/tiny.toml: {steps} steps of {base.tokens_per_step:,} tokens, seed {base.training.seed}; the "
        f"adapter runs train full-rank for the first {warm} steps, then rank-{base.relora.rank} adapters "
        f"(ReLoRA: merge every {base.relora.restart_every} steps, magnitude reset {base.relora.reset_ratio}). "
        f"Eval: {base.data.eval_tokens:,} held-out tokens.", "", *table])


if __name__ == "__main__":
    main()
