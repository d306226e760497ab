"""Continued-pre-training benchmark: what storing a pre-trained model's frozen weights quantized costs, and how much
of it adapters that start from the quantization residual (relora.init = "residual") pay back.

    python tools/bench_continued.py [--quick] [--start-only] [--only NAME ...] [--section.key=value ...]

A model pre-trained here (full-rank, PRETRAIN_STEPS steps of recipes/tiny.toml's model on the even-numbered works
of the sample corpus, exported; made once and cached under ~/.cache/qrelora/bench) continues on the odd-numbered
works with ReLoRA from step 0 on each storage (16-bit, NF4, FP4, int8) and each adapter start (zero, residual),
next to full-rank AdamW, each in its own process (tools/bench_methods.py runs them): the eval loss of the model
as read, at step 0 as stored, and at the end, with three seeds for the main rows. --start-only measures only the
step-0 cost, over the residual start's alternations and rank, NF4's block size, FP4 and int8.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_methods import SCALES, Method, run_one, spread_table  # noqa: E402
from results import record  # noqa: E402


def continued(base) -> list[Method]:
    """Continued pre-training of the pre-trained model: each storage with a zero and a residual start, next to
    full-rank AdamW and the 16-bit base."""
    k = f"--relora.init_iterations={base.relora.init_iterations}"
    storages = [("NF4", ["--quant.bits=4", "--quant.type=nf4"]), ("FP4", ["--quant.bits=4", "--quant.type=fp4"]),
                ("int8", ["--quant.bits=8"])]
    return [Method("full-rank AdamW", ["--relora.enabled=false", "--optim.name=adamw"], seeds=3),
            Method("ReLoRA, 16-bit base", ["--quant.bits=16"], seeds=3),
            *(Method(f"ReLoRA, {name}, {init} start", [*o, f"--relora.init={init}", k],
                     seeds=3 if name == "NF4" else 1)
              for name, o in storages for init in ("zero", "residual"))]


def start_grid(base) -> list[Method]:
    """Only the step-0 cost of storing the model, for each setting a residual start can vary (alternations, rank),
    the storage's own block size, and FP4 and int8."""
    nf4 = ["--quant.bits=4", "--quant.type=nf4"]
    rank = base.relora.rank
    return [Method("NF4, zero start", [*nf4, "--relora.init=zero"]),
            *(Method(f"NF4, residual start, {k} alternation(s)", [*nf4, "--relora.init=residual",
                                                                   f"--relora.init_iterations={k}"]) for k in (1, 3, 5)),
            *(Method(f"NF4, residual start, rank {r}", [*nf4, "--relora.init=residual", "--relora.init_iterations=3",
                                                         f"--relora.rank={r}"]) for r in (2 * rank, 4 * rank)),
            *(Method(f"NF4 blocksize {b}, zero start", [*nf4, f"--quant.blocksize={b}"]) for b in (32, 128)),
            Method("FP4, zero start", ["--quant.bits=4", "--quant.type=fp4"]),
            Method("FP4, residual start, 3 alternations", ["--quant.bits=4", "--quant.type=fp4",
                                                           "--relora.init=residual", "--relora.init_iterations=3"]),
            Method("int8, zero start", ["--quant.bits=8"]),
            Method("int8, residual start, 3 alternations", ["--quant.bits=8", "--relora.init=residual",
                                                            "--relora.init_iterations=3"])]


PRETRAIN_STEPS = 3600
# The pre-training's settings, pinned (recipes/tiny.toml's when this benchmark was made), so that the cached model
# stays the same model whatever the recipe becomes.
PRETRAIN = ["--model.preset=tiny", "--data.tokenizer=sample", "--data.seq_len=128", "--training.micro_batch_size=16",
            "--training.grad_accum=1", "--training.lr=2e-3", "--training.min_lr_ratio=0.1",
            "--training.warmup_steps=0.08333", "--training.embedding_lr_ratio=1", "--training.dtype=bf16",
            "--relora.enabled=false", f"--training.steps={PRETRAIN_STEPS}", "--training.eval_every=0"]


def pretrained_model(recipe_path: str, scale_overrides: list[str]) -> tuple[Path, Path]:
    """(an exported model pre-trained full-rank on the even-numbered works of the sample corpus, a directory of the
    odd-numbered works to continue on), made once and cached: PRETRAIN_STEPS steps of the tiny model (about ten
    passes over its works: at 1,200 steps 4-bit storage cost nothing measurable at step 0)."""
    import hashlib

    from qrelora.data import cache_dir, sample_corpus

    quick = [*scale_overrides, "--relora.enabled=false", "--training.steps=1200", "--training.eval_every=0"]
    pinned = quick if "--model.hidden_size=64" in scale_overrides else PRETRAIN
    key = hashlib.sha256(json.dumps(pinned).encode()).hexdigest()[:12]
    home = cache_dir() / "bench" / f"pretrained-{key}"
    model, rest = home / "model", home / "continue-on"
    if (model / "config.json").is_file():
        return model, rest
    works = sample_corpus()
    for part, chosen in (("pretrain-on", works[0::2]), ("continue-on", works[1::2])):
        (home / part).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(chosen):
            (home / part / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    run = home / "run"
    print(f"pre-training the benchmark's model ({PRETRAIN_STEPS} steps, once; cached in {home})", flush=True)
    subprocess.run([sys.executable, "-m", "qrelora", "train", recipe_path, *pinned, "--no-live",
                    f"--data.dataset={home / 'pretrain-on'}", f"--run.output_dir={run}", "--checkpoint.resume=never"],
                   check=True, stdout=subprocess.DEVNULL)
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    subprocess.run([sys.executable, "-m", "qrelora", "export", str(last), str(model), "--dtype", "fp32"], check=True,
                   stdout=subprocess.DEVNULL)
    return model, rest


# Continued pre-training: ReLoRA from step 0 in two cycles at a rate below the pre-training's, every method alike.
CONTINUED = ["--relora.warm_start_steps=0", "--relora.restart_every=0.5", "--relora.lr_ratio=1",
             "--training.warmup_steps=0.05", "--data.tokenizer=init_from"]
CONTINUED_STEPS = {"default": ["--training.steps=200", "--training.lr=1e-3"],
                   "quick": ["--training.steps=20", "--training.lr=1e-3"],
                   "gpu": ["--training.steps=200", "--training.lr=3e-4"]}


def main_pretrained(args, scale: str, recipe_path: str, scale_overrides: list[str], user: list[str]) -> None:
    from qrelora.recipe import load_recipe

    model, rest = pretrained_model(recipe_path, scale_overrides)
    shape_free = [o for o in scale_overrides if not o.startswith("--model.")]  # the model is the pre-trained one
    overrides = [*shape_free, *CONTINUED, *CONTINUED_STEPS[scale], f"--model.init_from={model}",
                 f"--data.dataset={rest}", *user]
    if args.start_only:  # two steps: the step-0 evaluation is all that is read
        overrides += ["--training.steps=2", "--relora.restart_every=2", "--training.warmup_steps=1",
                      "--relora.restart_warmup=0"]
    base = load_recipe(recipe_path, overrides)
    todo = start_grid(base) if args.start_only else continued(base)
    if args.only:
        todo = [m for m in todo if any(o in m.name for o in args.only)]
    rows, seeds, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for m in todo:
            run_seeds = args.seeds or (tuple(range(m.seeds)) if not (args.one_seed or args.start_only) else (0,))
            losses = []
            for seed in run_seeds:
                r = run_one(m, seed, recipe_path, overrides, Path(tmp))
                if "failed" in r:
                    losses.append(r)
                    break
                losses.append(r)
                print(f"{m.name:36s} seed {seed}  step 0 {r['curve'][0][1]:.4f}  end {r['eval_loss']:.4f}  "
                      f"{r['process_s']:.0f} s", flush=True)
            rows.append((m.name, losses))
            seeds[m.name] = [r["eval_loss"] for r in losses if "failed" not in r]
    total_min = (time.perf_counter() - started) / 60
    if args.start_only:
        return record_start_grid(args, scale, user, base, rows, total_min)
    ref = next((rs for name, rs in rows if name == "ReLoRA, 16-bit base"), None)
    ref_loss = sum(r["eval_loss"] for r in ref) / len(ref) if ref and "failed" not in ref[0] else None
    table = ["| method | eval loss, model as read | step 0, as stored | end (mean of seeds) | seeds | perplexity vs "
             "16-bit base at the end |", "|---|---|---|---|---|---|"]
    for name, results in rows:
        if "failed" in results[-1]:
            table.append(f"| {name} | failed: {results[-1]['failed'][:120]} | | | | |")
            continue
        first = results[0]
        own = first["unquantized_loss"]
        end = sum(r["eval_loss"] for r in results) / len(results)
        vs = f"{math.exp(end - ref_loss) - 1:+.1%}" if ref_loss is not None else "-"
        by_seed = " / ".join(f"{r['eval_loss']:.4f}" for r in results)
        own_text = "" if own is None else f"{own:.4f}"
        table.append(f"| {name} | {own_text} | {first['curve'][0][1]:.4f} | {end:.4f} | {by_seed} | {vs} |")
    b, rl = base.training, base.relora
    setting = (f"A {load_recipe(recipe_path, scale_overrides).model.preset}-shaped model pre-trained full-rank for "
               f"{PRETRAIN_STEPS} steps on the even-numbered works of the sample corpus, continued on the odd-numbered "
               f"ones: {b.steps} steps of {base.tokens_per_step:,} tokens at lr {b.lr:g}; ReLoRA from step 0, rank "
               f"{rl.rank} (alpha {rl.alpha:g}), {b.steps // rl.restart_every} cycles, residual starts with "
               f"{rl.init_iterations} alternation(s). Eval: {base.data.eval_tokens:,} held-out tokens of the continued-on "
               f"works. The whole run took {total_min:.0f} min.")
    spread, noise = spread_table(seeds)
    body = [setting, "", *table, "", f"Seed spread (the noise a difference must beat: {noise:.4f} in eval loss):", "",
            *spread]
    print("\n".join(body))
    heading = f"Continued pre-training ({scale})" + (f", {' '.join(user)}" if user else "") + \
        (f", only {' / '.join(args.only)}" if args.only else "")
    command = "python tools/bench_continued.py" + {"quick": " --quick", "gpu": " --gpu"}.get(scale, "") + \
        "".join(f" {o}" for o in user) + (" --only " + " ".join(repr(o) for o in args.only) if args.only else "")
    record(Path(args.results), heading, command, f"CPU ({platform.machine()}, {os.cpu_count()} cores)", body)


def record_start_grid(args, scale, user, base, rows, total_min) -> None:
    table = ["| storage and start | eval loss, model as read | as stored at step 0 | cost (nats) |", "|---|---|---|---|"]
    for name, results in rows:
        r = results[-1]
        if "failed" in r:
            table.append(f"| {name} | failed: {r['failed'][:120]} | | |")
            continue
        own, stored = r["unquantized_loss"], r["curve"][0][1]
        table.append(f"| {name} | {own:.4f} | {stored:.4f} | {stored - own:+.4f} |")
    setting = (f"The continued-pre-training benchmark's model ({PRETRAIN_STEPS} pre-training steps), evaluated at "
               f"step 0 on {base.data.eval_tokens:,} held-out tokens of the works it continues on, as read and as "
               f"stored; rank {base.relora.rank} unless named. The whole run took {total_min:.0f} min.")
    body = [setting, "", *table]
    print("\n".join(body))
    heading = f"Cost of storage at step 0, continued pre-training ({scale})" + (f", {' '.join(user)}" if user else "")
    command = "python tools/bench_continued.py --start-only" + \
        {"quick": " --quick", "gpu": " --gpu"}.get(scale, "") + "".join(f" {o}" for o in user)
    record(Path(args.results), heading, command, f"CPU ({platform.machine()}, {os.cpu_count()} cores)", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer model, 20 continued steps: a smoke run")
    ap.add_argument("--start-only", action="store_true",
                    help="only the step-0 cost of storage, over alternations, rank, block size, FP4 and int8")
    ap.add_argument("--only", nargs="*", help="run only the methods whose name contains one of these")
    ap.add_argument("--one-seed", action="store_true", help="skip the second and third seeds")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="run every method with these seeds")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args, user = ap.parse_known_args()
    from qrelora.cli import quiet_dependencies

    quiet_dependencies()
    scale = "quick" if args.quick else "tiny"
    recipe_path, scale_overrides = SCALES[scale]
    main_pretrained(args, "quick" if args.quick else "default", str(ROOT / recipe_path), scale_overrides, user)


if __name__ == "__main__":
    main()
