"""How a Hugging Face checkpoint loads into a continued-pre-training run on this machine's CPU: the time to read
it into NF4 (one tensor at a time, each attention / MLP matrix quantized as it is read, its fp32 master written
to a memory-mapped file), the process's peak resident memory, and optionally a few ReLoRA steps, next to what
reading it whole in fp32 (transformers' from_pretrained, as qrelora did before) needs.

    python tools/make_checkpoint.py /tmp/llama-7b-random --tokenizer     # a random 7B-shaped checkpoint
    python tools/load_check.py /tmp/llama-7b-random [--steps 1]

The run happens in a child process, so the peak is the load's alone. Prints a table and writes its section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
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
GiB = 2**30


def memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (Linux /proc), in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def child(checkpoint: str, recipe_path: str, steps: int, seq_len: int) -> dict:
    import torch

    import qrelora.train as train
    from qrelora.cli import quiet_dependencies
    from qrelora.monitor import PlainLog
    from qrelora.recipe import load_recipe

    quiet_dependencies()
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"start": memory()}
    build = train.build_run_model

    def timed_build(*args, **kwargs):
        t0 = time.perf_counter()
        model = build(*args, **kwargs)
        result["load_s"] = time.perf_counter() - t0
        result["after_load"] = memory()
        return model

    train.build_run_model = timed_build
    with tempfile.TemporaryDirectory(dir=Path(checkpoint).parent) as tmp:
        cycle = max(steps, 1)
        recipe = load_recipe(recipe_path, [
            f"--model.init_from={checkpoint}", f"--run.output_dir={tmp}", "--training.device=cpu",
            "--data.dataset=sample", f"--data.seq_len={seq_len}", f"--data.eval_tokens={seq_len}",
            "--training.micro_batch_size=1", "--training.grad_accum=1", f"--training.steps={cycle}",
            f"--relora.restart_every={cycle}", "--relora.restart_warmup=0", "--training.warmup_steps=0",
            "--training.eval_every=0", "--checkpoint.every=0", "--checkpoint.keep_last=1",
            "--checkpoint.resume=never", "--optim.name=adamw8bit"])
        t0 = time.perf_counter()
        trainer = train.Trainer(recipe, PlainLog(enabled=False))
        result["start_s"] = time.perf_counter() - t0
        from qrelora.pretrained import meta_model, tied_aliases

        shape = meta_model(checkpoint)
        result["parameters"] = sum(p.numel() for n, p in shape.named_parameters() if n not in tied_aliases(shape))
        result["steps"] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            record = trainer.step()
            result["steps"].append({"seconds": time.perf_counter() - t0, "loss": record.loss if record else None,
                                    "memory": memory()})
        trainer.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a Hugging Face model directory (tools/make_checkpoint.py writes one)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "continue_7b_24gb.toml"))
    p.add_argument("--steps", type=int, default=0, help="ReLoRA steps after the load (the last one merges)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.checkpoint, args.recipe, args.steps, args.seq_len)), flush=True)
        return

    from results import record

    from qrelora.pretrained import weight_files

    disk = weight_files(args.checkpoint, allow_pickle=False).total_bytes()
    command = " ".join(["python tools/load_check.py", args.checkpoint] + (["--steps", str(args.steps)] if args.steps
                                                                           else []))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, args.checkpoint, "--recipe", args.recipe, "--steps",
                          str(args.steps), "--seq-len", str(args.seq_len), "--child"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the load failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    r = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    wall = time.perf_counter() - t0
    fp32 = 4 * r["parameters"]
    load = r["after_load"]
    rows = [("checkpoint on disk", f"{disk / GiB:.2f} GiB"),
            ("parameters", f"{r['parameters'] / 1e9:.2f} B"),
            ("read into NF4 (one tensor at a time, fp32 master to an mmap file)", f"{r['load_s']:.0f} s"),
            ("peak resident memory after the load (VmHWM)", f"{load['VmHWM'] / GiB:.2f} GiB"),
            ("resident after the load: anonymous / file-backed", f"{load['RssAnon'] / GiB:.2f} / "
                                                                 f"{load['RssFile'] / GiB:.2f} GiB"),
            ("reading it whole in fp32 instead (from_pretrained): the weights alone", f"{fp32 / GiB:.2f} GiB")]
    for i, step in enumerate(r["steps"]):
        merge = ", then the merge" if i == len(r["steps"]) - 1 else ""
        m = step["memory"]
        rows.append((f"ReLoRA step {i + 1} (micro-batch 1 x {args.seq_len}{merge}): time, loss, peak resident; "
                     "resident after it, anonymous / file-backed",
                     f"{step['seconds']:.0f} s, {step['loss']:.3f}, {m['VmHWM'] / GiB:.2f} GiB; "
                     f"{m['RssAnon'] / GiB:.2f} / {m['RssFile'] / GiB:.2f} GiB"))
    rows.append(("whole child process (start-up, data, load, steps)", f"{wall:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    body = ["| measured | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    record(ROOT / "benchmarks" / "RESULTS.md", f"Loading {Path(args.checkpoint).name} into NF4 on the CPU", command,
           machine, body)


if __name__ == "__main__":
    main()
