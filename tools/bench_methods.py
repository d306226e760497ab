"""Methods benchmark: ReLoRA against the methods a user would pick instead, each at its best learning rate.

    python tools/bench_methods.py [--quick | --tiny | --gpu] [--sweep | --merges | --embedding] [--only NAME ...]
                                  [--no-tune] [--one-seed] [--section.key=value ...]

Every method trains the same model on the same data order, token budget and held-out set, each run in its own
process, one at a time. The default model is the bench preset (recipes/tiny.toml twice as deep) with a 2,048-entry
BPE of the sample corpus, so that 86% of its parameters sit in the decoder blocks as in the 1.3B model (about
90%); --tiny is the earlier benchmark's model (57% in the embeddings and head), --gpu the 60M preset on CUDA.

- full-rank AdamW (torch) and full-rank 8-bit AdamW (bitsandbytes);
- LoRA after the same full-rank warm start, no restarts: ours, and peft's (PyPI `peft`, its own layers);
- ReLoRA on a 16-bit base, on an NF4 base with each merge (exact, error_feedback, stochastic, naive) and with
  adapters that start from the quantization residual, and on an int8 base (exact);
- GaLore (PyPI `galore-torch`, GaLoreAdamW) and APOLLO (PyPI `apollo-torch`, APOLLOAdamW): full-parameter
  training with low-rank optimizer states, with their papers' 60M settings scaled to the model: rank
  hidden/4, GaLore's update scale 0.25.

One rule for the parameters no method makes low-rank: the embeddings, the LM head and the norms train at
training.embedding_lr_ratio times the method's rate in every method (GaLore's and APOLLO's un-projected group
too). Full-rank AdamW and 8-bit AdamW, our LoRA, ReLoRA NF4 exact, GaLore and APOLLO are tuned: each trains at
0.5x, 1x and 2x a starting rate (the recipe's, or 10x it for GaLore and APOLLO as in their papers), extended by
factors of 2 while the best is at an end of the grid; the other rows train at their family's best rate. Full-rank
AdamW, our LoRA, ReLoRA NF4 exact (with either start) and GaLore then run two more seeds: the spread is the noise
a difference must beat. For each method: eval loss, perplexity and tokens/s relative to full-rank AdamW, peak
memory (CUDA: peak allocated; CPU: the memory tool's tracker of live tensors over two training steps after the run)
and trainable state (parameters that get gradients plus optimizer states). Writes the tables to
benchmarks/RESULTS.md and the eval-loss curves to benchmarks/methods_<scale>.png. Every run's result is kept in a
run cache (~/.cache/qrelora/bench/runs, keyed by its settings and the package's sources), so a benchmark that
stops picks up where it was; --no-cache trains everything again.

--sweep trains ReLoRA NF4 exact with one lever changed at a time from the recipe's settings (learning rate ratio,
warm start, cycle length, reset, which rates restart, the embeddings' rate), next to full-rank
AdamW and LoRA. --merges trains NF4 exact, NF4 naive and the 16-bit base with 1x, 2x and 4x the recipe's merges.
--embedding trains full-rank AdamW with the embeddings, head and norms at 1x to 100x, then the best of those
multiples on each of them alone, and on the embeddings and the head a factor of 3 apart.

tools/bench_continued.py is the continued-pre-training benchmark (a model pre-trained here, continued on other
text with each storage and adapter start).

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
    seeds: int = 1
    """Seeds at the method's rate in the full benchmark (their spread is the noise a difference must beat)."""
    tune: float | None = None
    """Tuned: its learning-rate grid starts at 0.5x, 1x and 2x this multiple of the recipe's training.lr and
    grows by factors of 2 until the best rate is inside it."""
    family: str | None = None
    """Not tuned itself: it trains at the best rate of the method of this name."""
    role_scales: dict[str, float] | None = None
    """Rate multiples by role ("embeddings", "head", "norms"; 1 for any not named) instead of the recipe's
    training.embedding_lr_ratio (the embedding-rate study)."""


def methods(base) -> list[Method]:
    """The methods, as overrides of the recipe `base`: the tuned ones first, then those that take a tuned
    method's rate (the other ReLoRA storages and merges take ReLoRA NF4 exact's, peft's LoRA takes ours)."""
    full = ["--relora.enabled=false"]
    lora_cycle = f"--relora.restart_every={base.training.steps - base.relora.warm_start_steps}"  # one cycle
    nf4 = "ReLoRA, NF4 exact"
    return [
        Method("full-rank AdamW", [*full, "--optim.name=adamw"], seeds=3, tune=1.0),
        Method("full-rank 8-bit AdamW", [*full, "--optim.name=adamw8bit"], tune=1.0),
        Method("LoRA (ours), 16-bit base", ["--quant.bits=16", lora_cycle], seeds=3, tune=1.0),
        Method(nf4, ["--quant.bits=4", "--quant.merge=exact"], seeds=3, tune=1.0),
        # GaLore's and APOLLO's papers train their 60M model at 10x the learning rate of the full-rank AdamW
        # baseline (0.01 against 0.001), GaLore with its update scaled by 0.25: their grids start there.
        Method("GaLore", full, peer="galore", seeds=3, tune=10.0),
        Method("APOLLO", full, peer="apollo", tune=10.0),
        Method("LoRA (peft), 16-bit base", ["--quant.bits=16", lora_cycle], peer="peft",
               family="LoRA (ours), 16-bit base"),
        Method("ReLoRA, 16-bit base", ["--quant.bits=16"], family=nf4),
        Method("ReLoRA, NF4 exact, residual start", ["--quant.bits=4", "--quant.merge=exact", "--relora.init=residual",
                                                      "--relora.init_iterations=3"], seeds=3, family=nf4),
        Method("ReLoRA, NF4 error_feedback", ["--quant.bits=4", "--quant.merge=error_feedback"], family=nf4),
        Method("ReLoRA, NF4 stochastic", ["--quant.bits=4", "--quant.merge=stochastic"], family=nf4),
        Method("ReLoRA, NF4 naive", ["--quant.bits=4", "--quant.merge=naive"], family=nf4),
        Method("ReLoRA, int8 exact", ["--quant.bits=8", "--quant.merge=exact"], family=nf4),
    ]


EMBEDDING_MULTIPLES = (1, 3, 10, 30, 100)  # 100: the most the recipe check allows


def embedding_rates() -> list[Method]:
    """Full-rank AdamW at the recipe's rate with the embeddings, head and norms at several multiples of it
    (training.embedding_lr_ratio)."""
    full = ["--relora.enabled=false", "--optim.name=adamw"]
    return [Method(f"embeddings, head and norms at {x:g}x", [*full, f"--training.embedding_lr_ratio={x:g}"])
            for x in EMBEDDING_MULTIPLES]


def embedding_splits(r: float) -> list[Method]:
    """At the best multiple r of embedding_rates: r on one role at a time, and the embeddings and the head at
    different multiples (the child's role_scales), to find which parameters carry the effect."""
    full = ["--relora.enabled=false", "--optim.name=adamw"]
    split = {f"only the embeddings at {r:g}x": {"embeddings": r}, f"only the head at {r:g}x": {"head": r},
             f"only the norms at {r:g}x": {"norms": r},
             f"embeddings {r:g}x, head {r / 3:.3g}x, norms {r:g}x": {"embeddings": r, "head": r / 3, "norms": r},
             f"embeddings {r / 3:.3g}x, head {r:g}x, norms {r:g}x": {"embeddings": r / 3, "head": r, "norms": r}}
    return [Method(name, full, role_scales=scales) for name, scales in split.items()]


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
        # (left out: the re-warm-up's length, whose 10 steps beat 3 and 20 on the tiny model, and alpha, which
        # scales the adapters' update as relora.lr_ratio does; alpha 64 lost to 32 there at 5x, RESULTS.md)
        "--relora.reset_ratio=0.9",
        "--relora.jagged=all",
        *(f"--training.embedding_lr_ratio={v:.3g}" for v in (base.training.embedding_lr_ratio / 2,
                                                             base.training.embedding_lr_ratio * 2)),
    ]
    nf4 = ["--quant.bits=4", "--quant.merge=exact"]
    relora_steps = steps - rl.warm_start_steps
    return [Method("full-rank AdamW", ["--relora.enabled=false", "--optim.name=adamw"]),
            Method("LoRA (recipe settings, no restarts)", ["--quant.bits=16", f"--relora.restart_every={relora_steps}"]),
            Method("ReLoRA NF4 exact (recipe settings)", nf4),
            *(Method(o.removeprefix("--"), [*nf4, o]) for o in levers)]


def merge_cycles(base) -> list[int]:
    """Cycle lengths giving the recipe's number of merges, twice and four times it, over the same ReLoRA phase
    (to within the few steps that keep the cycles whole)."""
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


STEPS = 900

# Scales: the recipe and the overrides every method gets.
SCALES = {
    # The bench preset (tiny twice as deep) with a 2,048-entry BPE: 86% of the parameters in the blocks, as in the
    # 1.3B model. STEPS steps: about 7 minutes for full-rank AdamW (4.1-4.8k tokens/s) and 9 for ReLoRA NF4 (3.4k
    # tokens/s after the warm start) on the 2-core CPU, within the 10 minutes a run may take.
    "default": ("recipes/tiny.toml", ["--model.preset=bench", "--data.tokenizer=sample-2048", f"--training.steps={STEPS}",
                                      f"--training.eval_every={STEPS // 6}", f"--training.log_every={STEPS // 6}"]),
    # The earlier default: the tiny preset with the 8,192-entry sample tokenizer (57% of its parameters in the
    # embeddings and head), 300 steps.
    "tiny": ("recipes/tiny.toml", ["--training.steps=300", "--training.eval_every=50", "--training.log_every=50"]),
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


def peer_groups(model, rank: int, embedding_lr_ratio: float) -> list[dict]:
    """Param groups for GaLore / APOLLO: the attention and MLP matrices get the low-rank projection, the rest
    (embeddings, norms, head) plain Adam, as in both papers' code, at training.embedding_lr_ratio times the rate
    like every other method's (the trainer sets each group's rate from its lr_scale)."""
    from qrelora.relora import TARGET_MODULES

    projected, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projected if p.ndim == 2 and name.split(".")[-2] in TARGET_MODULES else rest).append(p)
    return [{"params": rest, "role": "embeddings", "lr_scale": embedding_lr_ratio},
            {"params": projected, "rank": rank, "role": "blocks", "lr_scale": 1.0}]


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
            if spec.get("role_scales"):
                self.optimizer = role_optimizer(self.unwrapped, self.recipe, spec["role_scales"], self.device.type)

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


def role_optimizer(model, recipe, scales: dict[str, float], device_type: str):
    """The recipe's optimizer with the LM head in a group of its own and each role at its multiple of the rate
    (scales: "embeddings", "head", "norms"; 1 for any not named)."""
    from qrelora.optim import OPTIMIZERS, param_groups, resolve_optimizer_name

    head = {id(p) for p in model.get_output_embeddings().parameters()}
    groups = []
    for g in param_groups(model, recipe.optim.weight_decay):
        parts = {g["role"]: [p for p in g["params"] if id(p) not in head]}
        if g["role"] == "embeddings":
            parts["head"] = [p for p in g["params"] if id(p) in head]
        for role, params in parts.items():
            if params:
                groups.append(g | {"params": params, "role": role, "lr_scale": scales.get(role, 1.0)})
    o = recipe.optim
    return OPTIMIZERS[resolve_optimizer_name(o, device_type)].build(groups, lr=recipe.training.lr, betas=tuple(o.betas),
                                                                    eps=o.eps)


def peer_optimizer(peer: str, model, recipe, hidden: int, cycle: int):
    """GaLore: rank hidden/4, scale 0.25, projection renewed every `cycle` steps (the paper's 60M setting is
    rank 128 at hidden 512, scale 0.25, every 200 of 10K steps). APOLLO: its paper's default (random
    projection of rank hidden/4, channel-wise scaling, scale 1; its 60M script: rank 128 at hidden 512). Both
    follow the run's schedule, which the trainer sets on every group at every step (methods() gives them 10x
    the full-rank rate, as their papers do), with the recipe's betas, eps and weight decay."""
    o = recipe.optim
    groups = peer_groups(model, rank=max(1, hidden // 4), embedding_lr_ratio=recipe.training.embedding_lr_ratio)
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


def source_digest() -> str:
    """A digest of the package's sources: a cached run counts only for the code that made it."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "qrelora").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_one(method: Method, seed: int, recipe: str, overrides: list[str], tmp: Path, lr: float | None = None,
            cache: bool = True) -> dict:
    """Train one method in its own process (or read the result of the same run, same sources, from the run cache
    under ~/.cache/qrelora/bench/runs: a long benchmark that stops can be started again)."""
    import hashlib

    from qrelora.data import cache_dir

    out = tmp / f"{len(list(tmp.iterdir()))}.json"
    rate = [f"--training.lr={lr:g}"] if lr is not None else []
    spec = {"recipe": recipe, "peer": method.peer, "role_scales": method.role_scales,
            "overrides": [*overrides, *method.overrides, *rate, f"--training.seed={seed}", "--checkpoint.every=0"]}
    key = hashlib.sha256(json.dumps([spec, Path(recipe).read_text(), source_digest()]).encode()).hexdigest()[:20]
    cached = cache_dir() / "bench" / "runs" / f"{key}.json"
    if cache and cached.is_file():
        return json.loads(cached.read_text()) | {"cached": True}
    spec["overrides"].append(f"--run.output_dir={tmp / out.stem}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        print(f"{method.name} (seed {seed}{f', lr {lr:g}' if lr else ''}) failed:\n" + "\n".join(lines[-15:]),
              file=sys.stderr)
        # A RecipeError is the recipe check refusing the setting (e.g. a rate whose embedding multiple passes 1).
        return {"failed": lines[-1] if lines else f"exit code {proc.returncode}",
                "refused": "RecipeError" in proc.stderr, "process_s": time.perf_counter() - t0}
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def loss_of(r: dict) -> float:
    """A run's final eval loss; a failed run (diverged, or refused at that rate) counts as the worst."""
    return math.inf if "failed" in r else r["eval_loss"]


def tune(m: Method, center: float, run) -> tuple[float, dict[float, dict]]:
    """(best rate, {rate: result}): rates 2x apart from center/2 to 2 center, extended by factors of 2 while the
    best is at an end (at most seven rates)."""
    grid = {rate: run(m, rate) for rate in (center / 2, center, 2 * center)}
    while len(grid) < 7:
        best = min(grid, key=lambda rate: loss_of(grid[rate]))
        if best == min(grid):
            grid[best / 2] = run(m, best / 2)
        elif best == max(grid) and not math.isinf(loss_of(grid[best])):
            grid[best * 2] = run(m, best * 2)
        else:
            break
    return min(grid, key=lambda rate: loss_of(grid[rate])), dict(sorted(grid.items()))


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def methods_table(results: dict[str, list[dict]], best: dict[str, float], tuned: bool,
                  ref_name: str = "full-rank AdamW", ref_label: str = "full-rank") -> list[str]:
    """One row per method at its rate: eval loss (the mean over its seeds), perplexity and tokens/s against
    the reference method's (full-rank AdamW), peak memory and trainable state."""
    ref = results.get(ref_name, [{"failed": ""}])
    ref_ok = [r for r in ref if "failed" not in r]
    ref_loss = sum(r["eval_loss"] for r in ref_ok) / len(ref_ok) if ref_ok else None
    table = [f"| method | learning rate | eval loss | seeds | ppl vs {ref_label} | tokens/s vs {ref_label} | peak memory | "
             "trainable state |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        ok = [r for r in rs if "failed" not in r]
        if not ok:
            table.append(f"| {name} | {best[name]:g} | failed: {rs[0]['failed'][:120]} | | | | | |")
            continue
        loss = sum(r["eval_loss"] for r in ok) / len(ok)
        seeds = " / ".join(f"{r['eval_loss']:.4f}" for r in ok) if len(ok) > 1 else "1"
        vs_ppl = f"{math.exp(loss - ref_loss) - 1:+.1%}" if ref_loss is not None else "-"
        vs_speed = f"{ok[0]['tokens_per_s'] / ref_ok[0]['tokens_per_s']:.2f}x" if ref_ok else "-"
        rate = f"{best[name]:g}" + ("" if tuned else " (recipe)")
        table.append(f"| {name} | {rate} | {loss:.4f} | {seeds} | {vs_ppl} | {vs_speed} | {mib(ok[0]['peak_bytes'])} | "
                     f"{mib(ok[0]['state_bytes'])} |")
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


def model_share(recipe) -> tuple[int, float]:
    """(parameters, share of them in the decoder blocks rather than the embeddings and LM head) of the recipe's
    model with its tokenizer's vocabulary."""
    from qrelora.data import load_tokenizer
    from qrelora.models import build_model

    model = build_model(recipe.model, vocab_size=len(load_tokenizer(recipe.data.tokenizer)),
                        seq_len=recipe.data.seq_len, device="meta")
    total = sum(p.numel() for p in model.parameters())
    outside = sum(p.numel() for p in model.model.embed_tokens.parameters()) + sum(
        p.numel() for p in model.lm_head.parameters())
    return total, 1 - outside / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="a 2-layer model for 30 steps: a smoke run")
    scale.add_argument("--tiny", action="store_true",
                       help="the earlier benchmark's model: the tiny preset with the 8,192-entry sample tokenizer")
    scale.add_argument("--gpu", action="store_true", help="the 60M preset on CUDA")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="vary ReLoRA's levers one at a time instead")
    mode.add_argument("--merges", action="store_true",
                      help="NF4 exact, NF4 naive and the 16-bit base with 1x, 2x and 4x the recipe's merges instead")
    mode.add_argument("--embedding", action="store_true",
                      help="full-rank AdamW with the embeddings, head and norms at several rates, and one at a time")
    ap.add_argument("--only", nargs="*", help="run only the methods whose name contains one of these (the "
                    "ratios to full-rank need \"full-rank AdamW\" among them)")
    ap.add_argument("--no-tune", action="store_true", help="every method at the recipe's rate (no grid)")
    ap.add_argument("--one-seed", action="store_true", help="one seed for every method")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="run every method with these seeds")
    ap.add_argument("--no-cache", action="store_true", help="train every run again instead of reading the run cache")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args, user = ap.parse_known_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(json.loads(args.child))))
        return

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe

    quiet_dependencies()
    scale = "quick" if args.quick else "gpu" if args.gpu else "tiny" if args.tiny else "default"
    recipe_path, scale_overrides = SCALES[scale]
    recipe_path = str(ROOT / recipe_path)
    # In a sweep, a merge count or the embedding study only the final loss counts: evaluate at start and end.
    finals_only = args.sweep or args.merges or args.embedding
    overrides = [*scale_overrides, *(["--training.eval_every=0"] if finals_only else []), *user]
    base = load_recipe(recipe_path, overrides)
    todo = (sweep(base) if args.sweep else merge_counts(base) if args.merges else embedding_rates()
            if args.embedding else methods(base))

    def chosen(ms: list[Method]) -> list[Method]:
        return [m for m in ms if any(o in m.name for o in args.only)] if args.only else ms

    todo = chosen(todo)
    tuned = not (finals_only or args.no_tune)

    best: dict[str, float] = {}
    grids: dict[str, dict[float, dict]] = {}
    results: dict[str, list[dict]] = {}
    spent: list[float] = []  # each run's process time, a cached run's as it was measured
    with tempfile.TemporaryDirectory() as tmp:
        def run(m: Method, rate: float, seed: int) -> dict:
            r = run_one(m, seed, recipe_path, overrides, Path(tmp), lr=rate, cache=not args.no_cache)
            if not r.get("refused"):  # a run the recipe check refuses costs nothing; one that diverged does
                spent.append(r["process_s"])
            what = f"{m.name:40s} lr {rate:<8.3g} seed {seed}"
            if "failed" in r:
                print(f"{what}  failed", flush=True)
            else:
                took = "(cached)" if r.get("cached") else f"{r['process_s']:.0f} s"
                print(f"{what}  eval loss {r['eval_loss']:.4f}  {r['tokens_per_s']:8.0f} tok/s  {took}", flush=True)
            return r

        for m in todo:
            grid = None
            if tuned and m.tune is not None:
                rate, grid = tune(m, base.training.lr * m.tune, lambda mm, r: run(mm, r, 0))
                grids[m.name] = grid
            else:
                rate = best.get(m.family, base.training.lr * (m.tune or 1.0))
            best[m.name] = rate
            seeds = args.seeds or (list(range(m.seeds)) if tuned and not args.one_seed else [0])
            results[m.name] = [grid[rate] if grid is not None and seed == 0 else run(m, rate, seed) for seed in seeds]
            if args.embedding and m is todo[-1] and m.role_scales is None:
                # the multiples are done: split the best of them by role (appended, so this loop runs them too)
                done = {x: results.get(f"embeddings, head and norms at {x:g}x") for x in EMBEDDING_MULTIPLES}
                done = {x: rs[0] for x, rs in done.items() if rs}
                if done:
                    todo.extend(chosen(embedding_splits(min(done, key=lambda x: loss_of(done[x])))))
    ref = ("embeddings, head and norms at 1x", "1x") if args.embedding else ("full-rank AdamW", "full-rank")
    body = [setting_text(base, scale, spent, tuned, args), "", *methods_table(results, best, tuned, *ref)]
    if grids:
        body += ["", "Learning-rate grids (eval loss at each rate, seed 0; the best in bold):", "", *grid_table(grids)]
    seeds = {name: [r["eval_loss"] for r in rs if "failed" not in r] for name, rs in results.items()}
    spread, noise = spread_table(seeds)
    if len(spread) > 2:
        body += ["", f"Seed spread (the noise a difference must beat: {noise:.4f} in eval loss):", "", *spread]
    partial = [*user, *(["only", *args.only] if args.only else []),
               *(["seeds", *map(str, args.seeds)] if args.seeds else [])]
    if not finals_only:
        slug = re.sub(r"[^a-z0-9]+", "_", " ".join(partial).lower()).strip("_")
        png = Path(args.results).parent / f"methods_{scale}{'_' + slug if slug else ''}.png"
        if plot([(name, rs[0]) for name, rs in results.items()], png,
                f"Eval loss, {scale} benchmark ({base.training.steps} steps, each method at its rate, seed 0)"):
            body += ["", f"Curves: [{png.name}]({png.name})"]
    print("\n".join(body))
    what = ("ReLoRA lever sweep" if args.sweep else "Merge count" if args.merges else "Embedding rate" if args.embedding
            else "Methods benchmark")
    # A partial run (--only, --seeds, overrides) gets its own section instead of replacing the full table.
    heading = f"{what} ({scale})" + (f", {' '.join(user)}" if user else "") + \
        (f", only {' / '.join(args.only)}" if args.only else "") + \
        (f", seeds {' '.join(map(str, args.seeds))}" if args.seeds else "") + (", no tuning" if args.no_tune else "")
    command = "python tools/bench_methods.py" + {"quick": " --quick", "gpu": " --gpu", "tiny": " --tiny"}.get(scale, "") + \
        (" --sweep" if args.sweep else " --merges" if args.merges else " --embedding" if args.embedding else "") + \
        "".join(f" {o}" for o in user) + (" --only " + " ".join(repr(o) for o in args.only) if args.only else "") + \
        (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "") + (" --no-tune" if args.no_tune else "")
    import torch

    machine = (torch.cuda.get_device_name() if scale == "gpu" and torch.cuda.is_available() else
               f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    record(Path(args.results), heading, command, machine, body)


def setting_text(base, scale: str, spent: list[float], tuned: bool, args) -> str:
    from qrelora.models import model_dims

    b, rl = base.training, base.relora
    dims = model_dims(base.model)
    took = (f"The {len(spent)} runs took {sum(spent) / 60:.0f} min in all, one after another (a run read from the "
            "run cache counts its measured time).")
    total, share = model_share(base)
    restarting = "only the adapters' rate restarting" if rl.jagged == "adapters" else "every rate restarting"
    everies = merge_cycles(base) if args.merges else [rl.restart_every]
    rates = ("each method at the best of its learning-rate grid (below)" if tuned else f"lr {b.lr:g}")
    if args.embedding:
        return (f"{base.model.preset} model: {dims.hidden_size} hidden, {dims.num_layers} layers, "
                f"{total / 1e6:.2f}M parameters, {share:.0%} of them in the blocks (tokenizer {base.data.tokenizer}). "
                f"Full-rank AdamW, {b.steps} steps of {base.tokens_per_step:,} tokens "
                f"({b.steps * base.tokens_per_step / 1e6:.2f}M tokens) at lr {b.lr:g}; the embeddings, LM head and "
                "norms at the multiple of it named (the rest at 1x). Eval: "
                f"{base.data.eval_tokens:,} held-out tokens. {took}")
    return (f"{base.model.preset} model: {dims.hidden_size} hidden, {dims.num_layers} layers, "
            f"{total / 1e6:.2f}M parameters, {share:.0%} of them in the blocks (tokenizer {base.data.tokenizer}). "
            f"{b.steps} steps of {base.tokens_per_step:,} tokens ({b.steps * base.tokens_per_step / 1e6:.2f}M tokens), "
            f"{rates}; embeddings, head and norms at {b.embedding_lr_ratio:g}x the rate in every method. Adapter "
            f"methods: full-rank warm start for {rl.warm_start_steps} steps, then rank {rl.rank} (alpha {rl.alpha:g}) "
            f"at {rl.lr_ratio:g}x the rate; ReLoRA merges every {' / '.join(map(str, everies))} steps (re-warm-up "
            f"{rl.restart_warmup}, {rl.reset} reset {rl.reset_ratio:g}; {restarting}). GaLore / APOLLO: rank "
            f"{max(1, dims.hidden_size // 4)}, projection renewed every {rl.restart_every} steps. Eval: "
            f"{base.data.eval_tokens:,} held-out tokens. {took}")


def outcome(r: dict) -> str:
    """A run's eval loss, or why it has none."""
    if "failed" not in r:
        return f"{r['eval_loss']:.4f}"
    return "refused by the recipe check" if r.get("refused") else "failed"


def grid_table(grids: dict[str, dict[float, dict]]) -> list[str]:
    table = ["| method | learning rate: eval loss |", "|---|---|"]
    for name, grid in grids.items():
        best = min(grid, key=lambda rate: loss_of(grid[rate]))
        cells = [f"**{rate:g}: {loss_of(r):.4f}**" if rate == best else f"{rate:g}: {outcome(r)}"
                 for rate, r in grid.items()]
        table.append(f"| {name} | {' / '.join(cells)} |")
    return table


if __name__ == "__main__":
    main()
