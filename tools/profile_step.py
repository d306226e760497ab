"""Where a training step's time goes: ReLoRA on a 4-bit base against full-rank, by category, and one layer alone.

    python tools/profile_step.py                         # the tiny shape on CPU (~3 min)
    python tools/profile_step.py --gpu --tokenizer DIR   # the 1b3_24gb recipe's shape and micro-batch on CUDA

Part 1, the step: each variant trains a few real steps of the recipe (`Trainer.step`, activation checkpointing
on, as in the 24 GB recipes) under torch.profiler, and every operator's own time (CPU time on
CPU, kernel time on CUDA) is put in one category: dequantization, the q/k/v/o and MLP GEMMs, the adapters'
GEMMs, the LM head's GEMMs, attention, the loss, the optimizer step, and the rest (element-wise ops, norms,
copies, allocation). Variants: ReLoRA as the trainer runs it (each layer one autograd function, the
checkpointed backward reusing the recompute's dequantized weight), ReLoRA with the layer as separate autograd
ops (before it became one function), ReLoRA without checkpointing (relora.activation_checkpointing = false),
and full-rank. The step times come from steps run without the profiler, the variants' trainers taking turns in
one process: timed in separate processes, the same code differed by up to 10% on the 2-core CPU.

Part 2, one layer: forward + backward + AdamW step of a ReLoRA layer (4-bit base, rank r, the recipe's adapter
dropout) against an nn.Linear of the same shape, with and without checkpointing, under bf16 autocast: the ratio
a whole step tends to; also the layer dequantizing again in the backward instead of reusing the recompute's
weight, and the layer as separate autograd ops. As in a model, the layer's input needs its gradient and an op
that saves the layer's output follows it.

Part 3, the LM head and loss alone at the step's tokens: qrelora's chunked loss (qrelora.loss) against
transformers' loss over the whole logits; time, and on CUDA the peak memory each allocates.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DEQUANTIZE = "qrelora: dequantize"
CHUNKED_LOSS = "_LinearCrossEntropyFn"  # qrelora.loss's autograd function: its non-GEMM ops are the loss
CATEGORIES = ("dequantize", "q/k/v/o and MLP GEMMs", "adapter GEMMs", "LM head GEMMs", "attention", "loss",
              "optimizer step", "other ops")
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}

SCALES = {  # recipe, overrides, (layer shape out x in, tokens, rank)
    "cpu": ("recipes/tiny.toml", ["--training.activation_checkpointing=true"], (2048, 2048, 2048, 128)),
    "gpu": ("recipes/1b3_24gb.toml", ["--data.dataset=sample"], (5461, 2048, 4096, 128)),
    "quick": ("recipes/tiny.toml", ["--training.activation_checkpointing=true", "--model.hidden_size=64",
                                    "--model.num_layers=2", "--model.num_heads=2", "--model.mlp_size=192",
                                    "--model.preset=custom", "--data.seq_len=64", "--training.micro_batch_size=4",
                                    "--relora.rank=8"], (256, 256, 256, 8)),
}


def variants() -> dict[str, dict]:
    return {"ReLoRA, 4-bit base": {"relora": True, "separate": False, "extra": []},
            "ReLoRA, 4-bit base, separate autograd ops": {"relora": True, "separate": True, "extra": []},
            "ReLoRA, 4-bit base, no checkpointing": {"relora": True, "separate": False,
                                                     "extra": ["--relora.activation_checkpointing=false"]},
            "full-rank": {"relora": False, "separate": False, "extra": []}}


# --------------------------------------------------------------------------------------------------
# The ReLoRA layer as autograd over separate ops, as qrelora computed it before the layer became one autograd
# function: kept to measure what that function gains on each machine (same math, same weight reuse).


def separate_ops_forward(layer, x):
    x16 = x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x
    y = FrozenMatmul.apply(x16, layer.base, layer.keep_weight)
    y = y + layer.scale * nn.functional.linear(nn.functional.linear(layer.dropout(x), layer.lora_A), layer.lora_B)
    return y + layer.bias if layer.bias is not None else y


class FrozenMatmul(torch.autograd.Function):
    """x @ W^T, saving W inside checkpointed blocks (keep_weight) or dequantizing again in backward."""

    @staticmethod
    def forward(ctx, x, frozen, keep_weight):
        w = frozen.dequantize(x.dtype)
        ctx.frozen, ctx.keep_weight = frozen, keep_weight
        if keep_weight:
            ctx.save_for_backward(w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.saved_tensors[0] if ctx.keep_weight else ctx.frozen.dequantize(grad_out.dtype)
        return grad_out.to(w.dtype) @ w, None, None


# --------------------------------------------------------------------------------------------------
# Part 1: one variant's steps, in its own process


def category(event, rank: int, vocab: int) -> str:
    names, parent = [event.name], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    if DEQUANTIZE in names:
        return "dequantize"
    if any(n == "optimizer step" or n.startswith("Optimizer.step") for n in names):
        return "optimizer step"
    name = event.name
    if name not in GEMMS and CHUNKED_LOSS in names:
        return "loss"
    if name in GEMMS:
        dims = {d for shape in event.input_shapes for d in shape}
        return "LM head GEMMs" if vocab in dims else "adapter GEMMs" if rank in dims else "q/k/v/o and MLP GEMMs"
    if "cross_entropy" in name or "log_softmax" in name or "nll_loss" in name:
        return "loss"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    return "other ops"


def child(spec: dict) -> dict:
    """Every variant's trainer in this one process: the timed steps take turns (so that a slow spell of a shared
    machine, or the allocator's state, falls on every variant alike), then each variant is profiled."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from qrelora.cli import quiet_dependencies
    from qrelora.recipe import load_recipe
    from qrelora.monitor import PlainLog
    from qrelora.quant import FrozenWeight
    from qrelora.relora import adapter_layers
    from qrelora.train import Trainer

    quiet_dependencies()
    warmup, profiled, timed = spec["steps"]
    steps = warmup + profiled + timed + 1  # the last step, which would merge, is never run
    trainers, recipes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, v in spec["variants"].items():
                overrides = [*spec["overrides"], *v["extra"], f"--run.output_dir={tmp}/{len(trainers)}",
                             f"--training.steps={steps}", "--training.warmup_steps=1", "--training.grad_accum=1",
                             "--training.eval_every=0", "--checkpoint.every=0"]
                overrides += (["--relora.warm_start_steps=0", f"--relora.restart_every={steps}",
                               "--relora.restart_warmup=0"] if v["relora"] else ["--relora.enabled=false"])
                recipes[name] = load_recipe(spec["recipe"], overrides)
                trainers[name] = trainer = Trainer(recipes[name], PlainLog(io.StringIO()))
                for _ in range(warmup):  # the first step converts to ReLoRA and pays for lazy initialisation
                    trainer.step()
                if v["separate"]:
                    for layer in adapter_layers(trainer.unwrapped):
                        layer.forward = types.MethodType(separate_ops_forward, layer)
            cuda = next(iter(trainers.values())).device.type == "cuda"
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            seconds = {name: [] for name in trainers}
            for _ in range(timed):
                for name, trainer in trainers.items():
                    sync()
                    t0 = time.perf_counter()
                    trainer.step()
                    sync()
                    seconds[name].append(time.perf_counter() - t0)

            real = FrozenWeight.dequantize

            def labelled(self, dtype=torch.float32):
                with record_function(DEQUANTIZE):
                    return real(self, dtype)

            FrozenWeight.dequantize = labelled
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            results = {}
            for name, trainer in trainers.items():
                trainer.phases = record_function  # forward, backward, optimizer step
                with profile(activities=activities, record_shapes=True) as prof:
                    for _ in range(profiled):
                        trainer.step()
                    sync()
                totals = dict.fromkeys(CATEGORIES, 0.0)
                for event in prof.events():
                    if event.device_type != DeviceType.CPU:
                        continue  # kernels are counted through the operator that launched them
                    us = event.self_device_time_total if cuda else event.self_cpu_time_total
                    totals[category(event, recipes[name].relora.rank, len(trainer.tokenizer))] += us / 1e3 / profiled
                results[name] = {"ms": totals, "step_s": statistics.median(seconds[name]),
                                 "tokens_per_step": recipes[name].tokens_per_step}
            FrozenWeight.dequantize = real
        finally:
            for trainer in trainers.values():
                trainer.close()
    return results


def run_child(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--out", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise SystemExit("a profiled variant failed:\n" + "\n".join(lines[-20:]))
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------
# Part 2: one layer


def layer_times(out_features: int, in_features: int, tokens: int, rank: int, dropout: float, device: str,
                repeats: int) -> dict:
    """Median seconds of forward + backward + AdamW step, bf16 autocast, fp32 trainables. The input needs its
    gradient, as every layer's input in a model does (else nn.Linear would skip its input-gradient GEMM and
    ReLoRA, which has no weight-gradient GEMM, would skip its only large backward GEMM)."""
    from torch.utils.checkpoint import checkpoint

    from qrelora.quant import FourBitCodec
    from qrelora.relora import ReLoRALinear

    torch.manual_seed(0)
    layers = {"nn.Linear": nn.Linear(in_features, out_features, bias=False, device=device)}
    for name in LAYERS[1:]:
        layer = ReLoRALinear(nn.Linear(in_features, out_features, bias=False, device=device), rank, rank, dropout,
                             FourBitCodec(), "naive")
        if name == "ReLoRA, separate autograd ops":
            layer.forward = types.MethodType(separate_ops_forward, layer)
        layers[name] = layer
    x = torch.randn(tokens, in_features, device=device, requires_grad=True)
    # Without checkpointing the weight is never kept: "dequantize again" would be the same code as "ReLoRA".
    variants = [(name, checkpointed) for checkpointed in (False, True) for name in layers
                if checkpointed or name != "ReLoRA, dequantize again"]

    def training_step(name: str, checkpointed: bool):
        layer = layers[name]
        opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-4)

        def run():
            if name != "nn.Linear":  # as add_adapters sets it, except in the variant that dequantizes again
                layer.keep_weight = checkpointed and name != "ReLoRA, dequantize again"
            with torch.autocast(device, dtype=torch.bfloat16):
                y = checkpoint(then_silu, layer, x, use_reentrant=False) if checkpointed else then_silu(layer, x)
            y.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None
        return run

    return {v: seconds for v, (seconds, _) in in_turns({v: training_step(*v) for v in variants}, repeats,
                                                          device).items()}


def then_silu(layer, x):
    """The layer followed by an op that saves its output, as the next op in a block does: so a checkpoint's
    recompute must run the layer. (Alone, nn.Linear's recompute would be free: torch stops recomputing once it
    has every saved tensor back, and nn.Linear saves only its inputs.)"""
    return nn.functional.silu(layer(x))


# --------------------------------------------------------------------------------------------------
# Part 3: the LM head and loss alone


def loss_times(tokens: int, hidden: int, vocab: int, device: str, repeats: int) -> dict:
    """Median seconds of the LM head and loss, forward and backward under bf16 autocast, and on CUDA the peak
    memory they allocate: qrelora's chunks against transformers' loss over the whole logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qrelora.loss import linear_cross_entropy

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(vocab, hidden, device=device) * 0.02)
    h = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    ways = {"chunked (qrelora)": lambda: linear_cross_entropy(h, weight, labels),
            "whole logits (transformers)": lambda: ForCausalLMLoss(nn.functional.linear(h, weight), labels, vocab)}

    def forward_backward(loss_of):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_of()
            loss.backward()
            weight.grad = h.grad = None
        return run

    return in_turns({name: forward_backward(loss_of) for name, loss_of in ways.items()}, repeats, device)


def in_turns(runs: dict, repeats: int, device: str) -> dict:
    """Each run (one iteration, a callable) `repeats` times after two unmeasured rounds, the runs taking turns so
    that a slow spell of a shared machine falls on each alike: {key: (median seconds, on CUDA the peak bytes it
    allocated, else None)}."""
    cuda = device == "cuda"
    seconds, peak = {key: [] for key in runs}, dict.fromkeys(runs, 0)
    for i in range(repeats + 2):
        for key, run in runs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
                peak[key] = max(peak[key], torch.cuda.max_memory_allocated() - before)
            if i >= 2:
                seconds[key].append(time.perf_counter() - t0)
    return {key: (statistics.median(s), peak[key] if cuda else None) for key, s in seconds.items()}


# --------------------------------------------------------------------------------------------------


LAYERS = ("nn.Linear", "ReLoRA", "ReLoRA, dequantize again", "ReLoRA, separate autograd ops")
STEPS, LAYER_REPEATS = (2, 3, 8), 30  # rounds of the layer variants, which take turns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--gpu", action="store_true", help="the 1b3_24gb recipe's shape on CUDA")
    scale.add_argument("--quick", action="store_true", help="a 2-layer model and a small layer: a smoke run")
    ap.add_argument("--tokenizer", default="", help="a local tokenizer directory (the GPU machine has no hub)")
    ap.add_argument("--steps", type=int, nargs=3, default=STEPS, metavar=("WARMUP", "PROFILED", "TIMED"))
    ap.add_argument("--layer-repeats", type=int, default=LAYER_REPEATS)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(json.loads(args.child))))
        return

    from results import record

    from qrelora.recipe import load_recipe
    from qrelora.memory import vocab_size_of
    from qrelora.models import resolve_shape

    scale = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    recipe, overrides, (out_f, in_f, tokens, rank) = SCALES[scale]
    overrides = [*overrides, *([f"--data.tokenizer={args.tokenizer}"] if args.tokenizer else [])]
    if args.gpu:
        overrides.append("--training.device=cuda")
    t0 = time.perf_counter()
    rows = run_child({"recipe": str(ROOT / recipe), "overrides": overrides, "steps": list(args.steps),
                      "variants": variants()})
    print(f"step variants: {time.perf_counter() - t0:.0f} s", flush=True)
    names = list(rows)
    full = rows["full-rank"]
    body = [f"Recipe `{recipe}` with {' '.join(overrides)}, activation checkpointing on, one micro-batch of "
            f"{full['tokens_per_step']:,} tokens per step. Milliseconds per step by category (operators' own "
            f"{'kernel' if args.gpu else 'CPU'} time under torch.profiler, {args.steps[1]} steps after "
            f"{args.steps[0]}); the step time is the median of {args.steps[2]} steps run without the profiler, the "
            "variants taking turns in one process. \"separate autograd ops\": the layer as qrelora computed it before "
            "it became one autograd function (frozen product, adapter GEMMs, scaling and sum as separate ops).", "",
            "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        body.append(f"| {c} | " + " | ".join(f"{rows[n]['ms'][c]:.1f}" for n in names) + " |")
    body.append("| **profiled total** | " + " | ".join(f"**{sum(rows[n]['ms'].values()):.1f}**" for n in names) + " |")
    body.append("| step time, unprofiled (ms) | " + " | ".join(f"{1e3 * rows[n]['step_s']:.1f}" for n in names) + " |")
    body.append("| speed vs full-rank | " + " | ".join(f"{full['step_s'] / rows[n]['step_s']:.2f}x" for n in names) + " |")

    device = "cuda" if args.gpu else "cpu"
    loaded = load_recipe(ROOT / recipe, overrides)
    dropout = loaded.relora.dropout
    times = layer_times(out_f, in_f, tokens, rank, dropout, device, args.layer_repeats)
    body += ["", f"One layer, {out_f} x {in_f}, {tokens:,} tokens, rank {rank}, adapter dropout {dropout:g} (the "
             f"recipe's), 4-bit (NF4) base, followed by SiLU; forward + backward (input gradient included) + AdamW step under bf16 "
             f"autocast, median of {args.layer_repeats} (the variants taking turns):", "",
             "| layer | no checkpointing | checkpointed | speed vs nn.Linear (no ckpt / ckpt) |", "|---|---|---|---|"]
    lin = times[("nn.Linear", False)], times[("nn.Linear", True)]
    for name in LAYERS:
        plain, ckpt = times.get((name, False)), times[(name, True)]
        body.append(f"| {name} | {f'{1e3 * plain:.1f} ms' if plain else '(as above)'} | {1e3 * ckpt:.1f} ms | "
                    f"{f'{lin[0] / plain:.2f}x' if plain else '-'} / {lin[1] / ckpt:.2f}x |")

    hidden, (vocab, _) = resolve_shape(loaded.model).hidden_size, vocab_size_of(loaded)
    loss_tokens = full["tokens_per_step"]
    losses = loss_times(loss_tokens, hidden, vocab, device, args.layer_repeats)
    body += ["", f"The LM head and loss alone, {loss_tokens:,} tokens x {hidden} hidden -> {vocab:,} entries; forward "
             f"+ backward under bf16 autocast, median of {args.layer_repeats} (taking turns):", "",
             "| LM head + loss | time |" + (" peak memory allocated |" if args.gpu else ""),
             "|---|---|" + ("---|" if args.gpu else "")]
    for name, (seconds, peak) in losses.items():
        body.append(f"| {name} | {1e3 * seconds:.1f} ms |" + (f" {peak / 2**20:,.0f} MiB |" if args.gpu else ""))
    print("\n".join(body))
    machine = (f"CUDA ({__import__('torch').cuda.get_device_name()})" if args.gpu
               else f"CPU ({platform.machine()}, {__import__('os').cpu_count()} cores)")
    given = [f"--{scale}"] if scale != "cpu" else []
    given += [f"--tokenizer {args.tokenizer}"] if args.tokenizer else []
    given += [f"--steps {' '.join(map(str, args.steps))}"] if tuple(args.steps) != STEPS else []
    given += [f"--layer-repeats {args.layer_repeats}"] if args.layer_repeats != LAYER_REPEATS else []
    record(Path(args.results), f"Step profile, ReLoRA against full-rank ({scale})",
           " ".join(["python tools/profile_step.py", *given]), machine, body)


if __name__ == "__main__":
    main()
