"""Methods benchmark: ReLoRA against the methods a user would pick instead, at one token budget and seed.

    python tools/bench_methods.py [--quick | --gpu] [--only NAME ...] [--sweep] [--section.key=value ...]

Every method trains the same model on the same data order, token budget, seed and held-out set, starting
from recipes/tiny.toml (CPU) or the 60M preset (--gpu), each in its own process, one at a time:

- full-rank AdamW (torch) and full-rank 8-bit AdamW (bitsandbytes);
- LoRA after the same full-rank warm start, no restarts: ours, and peft's (PyPI `peft`, its own layers);
- ReLoRA on a 16-bit base, on an NF4 base with each merge (exact, error_feedback, stochastic, naive), and
  on an int8 base (exact);
- GaLore (PyPI `galore-torch`, GaLoreAdamW) and APOLLO (PyPI `apollo-torch`, APOLLOAdamW): full-parameter
  training with low-rank optimizer states, with their papers' 60M settings scaled to the model: rank
  hidden/4, GaLore's update scale 0.25, and 10x the full-rank learning rate (their 0.01 against 0.001).

Full-rank, our LoRA and ReLoRA NF4 exact run again with a second seed: the difference between the two seeds
is the noise a comparison must beat. For each method: final eval loss and perplexity, perplexity and
tokens/s relative to full-rank AdamW, peak memory (CUDA: peak allocated; CPU: the memory tool's tracker of
live tensors over two training steps after the run), trainable state (parameters that get gradients plus
optimizer states) and wall time. Writes a table to benchmarks/RESULTS.md and the eval-loss curves to
benchmarks/methods_<scale>.png.

--sweep instead trains ReLoRA NF4 exact with one lever changed at a time from the recipe's settings (learning
rate ratio, warm start, cycle length, re-warm-up, reset, alpha, which rates restart), next to full-rank AdamW.
--merges trains NF4 exact, NF4 naive and the 16-bit base with 1x, 2x and 4x the recipe's merges.

--pretrained is the continued-pre-training benchmark: a model pre-trained here (full-rank, on every other work
of the sample corpus, exported; cached under ~/.cache/qrelora/bench) continues on the other works, with
ReLoRA from step 0 on each storage (16-bit, NF4, FP4, int8) and adapter start (relora.init zero and
residual), next to full-rank AdamW: the eval loss before quantizing, at step 0 as stored, and at the end.

The peers need `pip install peft galore-torch apollo-torch` (the `bench` extra); plotting needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import record  # noqa: E402  (tools/ is on sys.path when run as a script)


@dataclass
class Method:
    name: str
    overrides: list[str] = field(default_factory=list)
    peer: str | None = None
    """None: the trainer as it is; "peft", "galore", "apollo": the peer's package does the low-rank part."""
    second_seed: bool = False


def methods(base) -> list[Method]:
    """The methods, as overrides of the recipe `base`."""
    full = ["--relora.enabled=false"]
    lora_cycle = f"--relora.restart_every={base.training.steps - base.relora.warm_start_steps}"  # one cycle
    # GaLore's and APOLLO's papers train their 60M model at 10x the learning rate of the full-rank AdamW
    # baseline (0.01 against 0.001), GaLore with its update scaled by 0.25.
    peer_lr = f"--training.lr={10 * base.training.lr:g}"
    return [
        Method("full-rank AdamW", [*full, "--optim.name=adamw"], second_seed=True),
        Method("full-rank 8-bit AdamW", [*full, "--optim.name=adamw8bit"]),
        Method("LoRA (ours), 16-bit base", ["--quant.bits=16", lora_cycle], second_seed=True),
        Method("LoRA (peft), 16-bit base", ["--quant.bits=16", lora_cycle], peer="peft"),
        Method("ReLoRA, 16-bit base", ["--quant.bits=16"]),
        Method("ReLoRA, NF4 exact", ["--quant.bits=4", "--quant.merge=exact"], second_seed=True),
        Method("ReLoRA, NF4 error_feedback", ["--quant.bits=4", "--quant.merge=error_feedback"]),
        Method("ReLoRA, NF4 stochastic", ["--quant.bits=4", "--quant.merge=stochastic"]),
        Method("ReLoRA, NF4 naive", ["--quant.bits=4", "--quant.merge=naive"]),
        Method("ReLoRA, int8 exact", ["--quant.bits=8", "--quant.merge=exact"]),
        Method("GaLore", [*full, peer_lr], peer="galore"),
        Method("APOLLO", [*full, peer_lr], peer="apollo"),
    ]


def sweep(base) -> list[Method]:
    """One lever at a time around the recipe's ReLoRA settings (NF4, exact merges), next to full-rank AdamW
    and LoRA (the same settings without restarts)."""
    rl, steps = base.relora, base.training.steps
    every = rl.restart_every / steps
    levers = [
        # relora.lr_ratio is at most 10 (recipe check); the third rate is left out when it would pass that
        *(f"--relora.lr_ratio={v:g}" for v in (rl.lr_ratio * 0.75, rl.lr_ratio * 1.5, rl.lr_ratio * 2.5) if v <= 10),
        # one cycle longer: a fractional warm start is rounded to whole cycles, so anything less comes back
        # to the recipe's own (0.5 did, with 100-step cycles in 300 steps)
        f"--relora.warm_start_steps={(rl.warm_start_steps + rl.restart_every) / steps:.4g}",
        f"--relora.restart_every={every / 2:.4g}",
        f"--relora.restart_warmup={max(1, rl.restart_warmup // 3)}",
        "--relora.reset_ratio=0.9",
        f"--relora.alpha={2 * rl.alpha:g}",
        "--relora.jagged=all",
    ]
    nf4 = ["--quant.bits=4", "--quant.merge=exact"]
    relora_steps = steps - rl.warm_start_steps
    return [Method("full-rank AdamW", ["--relora.enabled=false", "--optim.name=adamw"]),
            Method("LoRA (recipe settings, no restarts)", ["--quant.bits=16", f"--relora.restart_every={relora_steps}"]),
            Method("ReLoRA NF4 exact (recipe settings)", nf4),
            *(Method(o.removeprefix("--"), [*nf4, o]) for o in levers)]


def merge_cycles(base) -> list[int]:
    """Cycle lengths giving the recipe's number of merges, twice and four times it, over the same ReLoRA phase."""
    relora_steps = base.training.steps - base.relora.warm_start_steps
    cycles = relora_steps // base.relora.restart_every
    return [relora_steps // k for k in (cycles, 2 * cycles, 4 * cycles)]


def merge_counts(base) -> list[Method]:
    """NF4 exact, NF4 naive and the 16-bit base at each of merge_cycles: what re-quantizing costs grows with
    the merges."""
    relora_steps = base.training.steps - base.relora.warm_start_steps
    bases = [("NF4 exact", ["--quant.bits=4", "--quant.merge=exact"]),
             ("NF4 naive", ["--quant.bits=4", "--quant.merge=naive"]),
             ("16-bit base", ["--quant.bits=16"])]
    return [Method(f"ReLoRA, {name}, {relora_steps // every} merges", [*o, f"--relora.restart_every={every}"])
            for every in merge_cycles(base) for name, o in bases]


def continued(base) -> list[Method]:
    """Continued pre-training of the pre-trained model: each storage with a zero and a residual start, next to
    full-rank AdamW and the 16-bit base."""
    k = f"--relora.init_iterations={base.relora.init_iterations}"
    storages = [("NF4", ["--quant.bits=4", "--quant.type=nf4"]), ("FP4", ["--quant.bits=4", "--quant.type=fp4"]),
                ("int8", ["--quant.bits=8"])]
    return [Method("full-rank AdamW", ["--relora.enabled=false", "--optim.name=adamw"], second_seed=True),
            Method("ReLoRA, 16-bit base", ["--quant.bits=16"], second_seed=True),
            *(Method(f"ReLoRA, {name}, {init} start", [*o, f"--relora.init={init}", k],
                     second_seed=name == "NF4")
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


def pretrained_model(recipe_path: str, scale_overrides: list[str]) -> tuple[Path, Path]:
    """(an exported model pre-trained full-rank on the even-numbered works of the sample corpus, a directory of the
    odd-numbered works to continue on), made once and cached: PRETRAIN_STEPS steps of the recipe's model (about
    ten passes over its works: at 1,200 steps 4-bit storage cost nothing measurable at step 0)."""
    import hashlib

    from qrelora.data import cache_dir, sample_corpus

    key = hashlib.sha256(json.dumps([recipe_path, scale_overrides, PRETRAIN_STEPS]).encode()).hexdigest()[:12]
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
    subprocess.run([sys.executable, "-m", "qrelora", "train", recipe_path, *scale_overrides, "--no-live",
                    "--relora.enabled=false", f"--training.steps={PRETRAIN_STEPS}", "--training.eval_every=0",
                    f"--data.dataset={home / 'pretrain-on'}", f"--run.output_dir={run}", "--checkpoint.resume=never"],
                   check=True, stdout=subprocess.DEVNULL)
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    subprocess.run([sys.executable, "-m", "qrelora", "export", str(last), str(model), "--dtype", "fp32"], check=True,
                   stdout=subprocess.DEVNULL)
    return model, rest


# Scales: the recipe and the overrides every method gets.
SCALES = {
    "default": ("recipes/tiny.toml", ["--training.steps=300", "--training.eval_every=50", "--training.log_every=50"]),
    "quick": ("recipes/tiny.toml", ["--training.steps=30", "--training.micro_batch_size=4", "--data.seq_len=64",
                                    "--data.eval_tokens=4096", "--model.hidden_size=64", "--model.num_layers=2",
                                    "--model.num_heads=2", "--model.mlp_size=192",
                                    "--training.eval_every=10", "--training.log_every=10", "--relora.rank=8",
                                    "--relora.restart_warmup=2"]),
    # The paper's 60M shape with its rank 128, on the sample data.
    "gpu": ("recipes/tiny.toml", ["--model.preset=60m", "--training.device=cuda", "--data.seq_len=256",
                                  "--training.micro_batch_size=16", "--training.steps=200", "--training.lr=1e-3",
                                  "--relora.rank=128", "--data.eval_tokens=65536", "--training.eval_every=25",
                                  "--training.log_every=25"]),
}


# --------------------------------------------------------------------------------------------------
# One method in one process


def peer_groups(model, rank: int) -> list[dict]:
    """Param groups for GaLore / APOLLO: the attention and MLP matrices get the low-rank projection, the rest
    (embeddings, norms, head) plain Adam, as in both papers' code."""
    from qrelora.relora import TARGET_MODULES

    projected, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projected if p.ndim == 2 and name.split(".")[-2] in TARGET_MODULES else rest).append(p)
    return [{"params": rest}, {"params": projected, "rank": rank}]


def child(spec: dict) -> dict:
    """Train one method and measure it (runs in its own process)."""
    import io

    import torch

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.memory.tracker import StorageTracker, register_all
    from qrelora.models import model_dims
    from qrelora.monitor import PlainLog
    from qrelora.train import Trainer

    quiet_dependencies()
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    hidden = model_dims(recipe.model).hidden_size
    cycle = recipe.relora.restart_every
    peer = spec["peer"]

    class Bench(Trainer):
        def _prepare(self, model, old_optimizer=None):
            super()._prepare(model, old_optimizer)
            if peer in ("galore", "apollo"):
                self.optimizer = peer_optimizer(peer, self.unwrapped, self.recipe, hidden, cycle)

        def switch_to_relora(self):
            if peer != "peft":
                return super().switch_to_relora()
            from peft import LoraConfig, inject_adapter_in_model

            from qrelora.relora import TARGET_MODULES

            old = self.optimizer
            model = self.accelerator.unwrap_model(self.model)
            self.accelerator.free_memory()
            cfg = self.recipe.relora
            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               target_modules=list(TARGET_MODULES), bias="none"), model)
            for name, p in model.named_parameters():  # as ours: embeddings, norms and head keep training
                adapted = any(part in TARGET_MODULES for part in name.split("."))
                p.requires_grad = "lora_" in name or not adapted
            self.relora.active = True
            self._prepare(model, old)

        def _save_and_log(self):
            pass  # the benchmark keeps no checkpoints (and the peers' optimizers hold objects they cannot store)

        def merge(self):
            if peer != "peft":  # peft's LoRA has no restarts: the one cycle's end merges nothing
                super().merge()

    trainer = Bench(recipe, PlainLog(io.StringIO()))
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        result = trainer.run()
        state = sum(p.numel() * p.element_size() for p in trainer.trainable)
        extra = list(optimizer_tensors(trainer.optimizer))
        state += sum(t.numel() * t.element_size() for t in extra)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            tracker = StorageTracker(len(trainer.tokenizer))
            register_all(tracker, trainer.unwrapped, trainer.optimizer)
            for t in extra:
                tracker.register(t, "optimizer states")
            with tracker:
                for _ in range(2):
                    trainer.train_step(lr=0.0)
            peak = max(tracker.peak.values())
    finally:
        trainer.close()
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and "event" not in r]
    unquantized = [r["eval_loss_unquantized"] for r in records if r.get("event") == "quantization_cost"]
    not_training = sum(r.get("eval_s", 0.0) for r in records if r.get("step", 0) > 0)
    tokens = result["steps"] * recipe.tokens_per_step
    return {"eval_loss": result["last_eval_loss"], "curve": evals, "wall_s": result["wall_s"],
            "unquantized_loss": unquantized[0] if unquantized else None,
            "tokens_per_s": tokens / max(result["wall_s"] - not_training, 1e-9), "peak_bytes": peak,
            "state_bytes": state}


def peer_optimizer(peer: str, model, recipe, hidden: int, cycle: int):
    """GaLore: rank hidden/4, scale 0.25, projection renewed every `cycle` steps (the paper's 60M setting is
    rank 128 at hidden 512, scale 0.25, every 200 of 10K steps). APOLLO: its paper's default (random
    projection of rank hidden/4, channel-wise scaling, scale 1; its 60M script: rank 128 at hidden 512). Both
    follow the run's schedule, which the trainer sets on every group at every step (methods() gives them 10x
    the full-rank rate, as their papers do), with the recipe's betas, eps and weight decay."""
    o = recipe.optim
    groups = peer_groups(model, rank=max(1, hidden // 4))
    kwargs = dict(lr=recipe.training.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if peer == "galore":
        from galore_torch import GaLoreAdamW

        groups[1].update(update_proj_gap=cycle, scale=0.25, proj_type="std")
        return GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs)
    from apollo_torch import APOLLOAdamW

    groups[1].update(update_proj_gap=cycle, scale=1.0, proj="random", proj_type="std", scale_type="channel")
    return APOLLOAdamW(groups, no_deprecation_warning=True, **kwargs)


def optimizer_tensors(optimizer):
    """Every tensor of the optimizer's state, the projection matrices GaLore and APOLLO keep in their
    projector objects included."""
    import torch

    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(getattr(v, "ortho_matrix", None), torch.Tensor):
                yield v.ortho_matrix


# --------------------------------------------------------------------------------------------------
# The benchmark


def run_one(method: Method, seed: int, recipe: str, overrides: list[str], tmp: Path) -> dict:
    out = tmp / f"{len(list(tmp.iterdir()))}.json"
    spec = {"recipe": recipe, "peer": method.peer,
            "overrides": [*overrides, *method.overrides, f"--training.seed={seed}",
                          f"--run.output_dir={tmp / out.stem}", "--checkpoint.every=0"]}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        print(f"{method.name} (seed {seed}) failed:\n" + "\n".join(lines[-15:]), file=sys.stderr)
        return {"failed": lines[-1] if lines else f"exit code {proc.returncode}"}
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def methods_table(rows: list[tuple[str, dict]]) -> list[str]:
    ref = dict(rows).get("full-rank AdamW")
    ref = None if ref is None or "failed" in ref else ref
    table = ["| method | eval loss | perplexity | ppl vs full-rank | tokens/s vs full-rank | peak memory | "
             "trainable state | wall |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        if "failed" in r:
            table.append(f"| {name} | failed: {r['failed'][:120]} | | | | | | |")
            continue
        ppl = math.exp(r["eval_loss"])
        vs_ppl = f"{ppl / math.exp(ref['eval_loss']) - 1:+.1%}" if ref else "-"
        vs_speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        table.append(f"| {name} | {r['eval_loss']:.4f} | {ppl:.2f} | {vs_ppl} | {vs_speed} | {mib(r['peak_bytes'])} | "
                     f"{mib(r['state_bytes'])} | {r['wall_s']:.0f} s |")
    return table


def spread_table(seeds: dict[str, list[float]]) -> tuple[list[str], float]:
    table = ["| method | eval loss by seed | largest difference |", "|---|---|---|"]
    noise = 0.0
    for name, losses in seeds.items():
        if len(losses) > 1:
            diff = max(losses) - min(losses)
            noise = max(noise, diff)
            table.append(f"| {name} | {' / '.join(f'{v:.4f}' for v in losses)} | {diff:.4f} |")
    return table, noise


def plot(rows: list[tuple[str, dict]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    rows = [(name, r) for name, r in rows if "failed" not in r]
    for name, r in rows:
        steps, losses = zip(*[(s, l) for s, l in r["curve"] if s > 0])
        style = "-" if "ReLoRA" in name or "full-rank AdamW" == name else "--"
        ax.plot(steps, losses, style, label=name, linewidth=1.4)
    finals = [r["eval_loss"] for _, r in rows]
    ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="a 2-layer model for 30 steps: a smoke run (~4 min)")
    scale.add_argument("--gpu", action="store_true", help="the 60M preset on CUDA")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="vary ReLoRA's levers one at a time instead")
    mode.add_argument("--merges", action="store_true",
                      help="NF4 exact, NF4 naive and the 16-bit base with 1x, 2x and 4x the recipe's merges instead")
    mode.add_argument("--pretrained", action="store_true",
                      help="continued pre-training of a model pre-trained here: each storage, zero and residual starts")
    ap.add_argument("--start-only", action="store_true",
                    help="with --pretrained: only the step-0 cost of storage, over alternations, rank, block size")
    ap.add_argument("--only", nargs="*", help="run only the methods whose name contains one of these (the "
                    "ratios to full-rank need \"full-rank AdamW\" among them)")
    ap.add_argument("--one-seed", action="store_true", help="skip the second-seed runs")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                    help="run every method with these seeds (default: seed 0, and seed 1 too for full-rank AdamW, "
                         "our LoRA and ReLoRA NF4 exact)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(json.loads(args.child))))
        return

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.models import model_dims

    quiet_dependencies()
    scale = "quick" if args.quick else "gpu" if args.gpu else "default"
    recipe_path, scale_overrides = SCALES[scale]
    recipe_path = str(ROOT / recipe_path)
    user = overrides
    if args.pretrained:
        return main_pretrained(args, scale, recipe_path, scale_overrides, user)
    # In a sweep or a merge count only the final loss counts: evaluate at the start and the end.
    finals_only = args.sweep or args.merges
    overrides = [*scale_overrides, *(["--training.eval_every=0"] if finals_only else []), *user]
    base = load_recipe(recipe_path, overrides)
    todo = sweep(base) if args.sweep else merge_counts(base) if args.merges else methods(base)
    if args.only:
        todo = [m for m in todo if any(o in m.name for o in args.only)]

    rows, seeds = [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for m in todo:
            run_seeds = args.seeds or ((0, 1) if m.second_seed and not (finals_only or args.one_seed) else (0,))
            for seed in run_seeds:
                r = run_one(m, seed, recipe_path, overrides, Path(tmp))
                if seed == run_seeds[0]:
                    rows.append((m.name, r))
                if "failed" in r:
                    break
                seeds.setdefault(m.name, []).append(r["eval_loss"])
                print(f"{m.name:40s} seed {seed}  eval loss {r['eval_loss']:.4f}  {r['tokens_per_s']:8.0f} tok/s  "
                      f"peak {mib(r['peak_bytes']):>10s}  state {mib(r['state_bytes']):>10s}  "
                      f"{r['process_s']:.0f} s", flush=True)
    total_min = (time.perf_counter() - started) / 60

    b, rl = base.training, base.relora
    first_seed = args.seeds[0] if args.seeds else 0
    dims = model_dims(base.model)
    restarting = "only the adapters' rate restarting" if rl.jagged == "adapters" else "every rate restarting"
    everies = merge_cycles(base) if args.merges else [rl.restart_every]
    setting = (f"{base.model.preset} model ({dims.hidden_size} hidden, {dims.num_layers} layers), "
               f"{b.steps} steps of {base.tokens_per_step:,} tokens, lr {b.lr:g}, seed {first_seed}; adapter methods: "
               f"full-rank warm start for {rl.warm_start_steps} steps, then rank {rl.rank} (alpha {rl.alpha:g}) "
               f"at {rl.lr_ratio:g}x the learning rate; ReLoRA merges every {' / '.join(map(str, everies))} steps "
               f"(re-warm-up {rl.restart_warmup}, {rl.reset} reset {rl.reset_ratio:g}; "
               f"{restarting}). " +
               ("" if finals_only else f"GaLore / APOLLO: lr {10 * b.lr:g}, rank {max(1, dims.hidden_size // 4)}, "
                                      f"projection renewed every {rl.restart_every} steps. ") +
               f"Eval: {base.data.eval_tokens:,} held-out tokens. The whole run took {total_min:.0f} min.")
    table = methods_table(rows)
    body = [setting, "", *table]
    if not finals_only:
        spread, noise = spread_table(seeds)
        if len(spread) > 2:  # some method ran with more than one seed
            body += ["", f"Seed spread (the noise a difference must beat: {noise:.4f} in eval loss):", "", *spread]
        partial = [*user, *(["only", *args.only] if args.only else []),
                   *(["seeds", *map(str, args.seeds)] if args.seeds else [])]
        slug = re.sub(r"[^a-z0-9]+", "_", " ".join(partial).lower()).strip("_")
        png = Path(args.results).parent / f"methods_{scale}{'_' + slug if slug else ''}.png"
        if plot(rows, png, f"Eval loss, {scale} benchmark ({b.steps} steps, seed {first_seed})"):
            body += ["", f"Curves: [{png.name}]({png.name})"]
    print("\n".join(body))
    what = "ReLoRA lever sweep" if args.sweep else "Merge count" if args.merges else "Methods benchmark"
    # A partial run (--only, --seeds, overrides) gets its own section instead of replacing the full table.
    heading = f"{what} ({scale})" + (f", {' '.join(user)}" if user else "") + \
        (f", only {' / '.join(args.only)}" if args.only else "") + \
        (f", seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
    command = "python tools/bench_methods.py" + {"quick": " --quick", "gpu": " --gpu"}.get(scale, "") + \
        (" --sweep" if args.sweep else " --merges" if args.merges else "") + "".join(f" {o}" for o in user) + \
        (" --only " + " ".join(repr(o) for o in args.only) if args.only else "") + \
        (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "")
    import torch

    machine = (torch.cuda.get_device_name() if scale == "gpu" and torch.cuda.is_available() else
               f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    record(Path(args.results), heading, command, machine, body)


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
        overrides += ["--training.steps=2", "--relora.restart_every=2", "--training.warmup_steps=1"]
    base = load_recipe(recipe_path, overrides)
    todo = start_grid(base) if args.start_only else continued(base)
    if args.only:
        todo = [m for m in todo if any(o in m.name for o in args.only)]
    rows, seeds, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for m in todo:
            run_seeds = args.seeds or ((0, 1, 2) if m.second_seed and not (args.one_seed or args.start_only) else (0,))
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
    command = "python tools/bench_methods.py --pretrained" + {"quick": " --quick", "gpu": " --gpu"}.get(scale, "") + \
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
    command = "python tools/bench_methods.py --pretrained --start-only" + \
        {"quick": " --quick", "gpu": " --gpu"}.get(scale, "") + "".join(f" {o}" for o in user)
    record(Path(args.results), heading, command, f"CPU ({platform.machine()}, {os.cpu_count()} cores)", body)


if __name__ == "__main__":
    main()
