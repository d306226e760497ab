"""Benchmark of quantized merges: how much of the intended update survives, and what a merge costs.

    python tools/bench_merge.py [--device cpu|cuda] [--skip-model] [--results benchmarks/RESULTS.md]

Part 1 (a synthetic test): a 2048x2048 Gaussian matrix (std 0.02) receives 20 merges of
rank-16 updates whose RMS is 1% of the weight's (a small fraction of a 4-bit quantization step, as late
in training). For each storage format and merge mode it reports the share of the intended total update
that the stored weight actually moved by (projection of stored change onto intended change; 1.0 is
lossless), and the noise the merges added (|stored change - intended| / |intended|).

Part 2: wall time of one merge of a 1.3B-shaped layer (2048x5461, the MLP) and of all 168 adapter layers
of the paper's 1.3B model, NF4 with double quantization, exact mode (master in host memory).

--residual instead times what adapters that start from the quantization residual (relora.init = "residual")
add to a merge at the 1.3B shape, rank 128: one layer of each shape, merged then split LoftQ-style with 1, 2,
3 and 5 alternations; the whole model's time from the 24 x (4 + 3) layers; the split's floating-point work,
from which a GPU's time is estimated; and its peak temporaries, measured.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qrelora.quant import MERGE_MODES, EightBitCodec, FourBitCodec, FrozenWeight  # noqa: E402
from results import record  # noqa: E402

FORMATS = {
    "NF4 (bs 64, double quant)": lambda: FourBitCodec("nf4", 64, True),
    "FP4 (bs 64)": lambda: FourBitCodec("fp4", 64, False),
    "int8 (bs 256, linear code)": lambda: EightBitCodec(256),
}


def survival(codec, mode, device, n=2048, rank=16, merges=20, rel_rms=0.01, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, n, generator=gen, device=device) * 0.02
    frozen = FrozenWeight(w, codec, mode, seed=seed)
    start = frozen.dequantize()
    total = torch.zeros_like(w)
    target_rms = rel_rms * 0.02
    for _ in range(merges):
        delta = torch.randn(n, rank, generator=gen, device=device) @ torch.randn(rank, n, generator=gen, device=device)
        delta *= target_rms / delta.pow(2).mean().sqrt()
        total += delta
        frozen.merge(delta)
    moved = frozen.dequantize() - start
    share = ((moved * total).sum() / (total * total).sum()).item()
    noise = ((moved - total).norm() / total.norm()).item()
    return share, noise


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def merge_times(device, skip_model):
    codec = FourBitCodec("nf4", 64, True)
    hidden, mlp, layers = 2048, 5461, 24
    shapes = [(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]  # q k v o, gate up, down
    rows = []
    w = torch.randn(mlp, hidden, device=device) * 0.02
    delta = torch.randn(mlp, hidden, device=device) * 1e-4
    for mode in ("exact", "error_feedback", "naive", "stochastic"):
        frozen = FrozenWeight(w, codec, mode)
        frozen.merge(delta)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            frozen.merge(delta)
        sync(device)
        rows.append((f"one 5461x2048 layer, {mode}", (time.perf_counter() - t0) / 3))
    if not skip_model:
        frozen_layers = []
        for _ in range(layers):
            for shape in shapes:
                frozen_layers.append(FrozenWeight(torch.randn(*shape, device=device) * 0.02, codec, "exact"))
        deltas = {shape: torch.randn(*shape, device=device) * 1e-4 for shape in set(shapes)}
        sync(device)
        t0 = time.perf_counter()
        for f in frozen_layers:
            f.merge(deltas[tuple(f.shape)])
        sync(device)
        rows.append((f"whole 1.3B model ({len(frozen_layers)} layers), exact", time.perf_counter() - t0))
    return rows


def split_flops(out_features: int, in_features: int, rank: int) -> float:
    """Floating-point operations of one alternation of FrozenWeight.split_off_low_rank: torch.svd_lowrank with
    q = rank + 10 and two power iterations multiplies the m x n matrix by an n x q or m x q one six times (the
    sketch, two round trips, the projection: 12 m n q), and U V^T is 2 m n r; QR and the small SVD are
    O((m + n) q^2), left out. Quantizing and dequantizing are memory-bound and not counted."""
    q = rank + 10
    return 12 * out_features * in_features * q + 2 * out_features * in_features * rank


def residual_times(device, rank=128, iterations=(1, 2, 3, 5)):
    from qrelora.memory.tracker import StorageTracker
    from qrelora.relora import ReLoRALinear

    hidden, mlp, layers = 2048, 5461, 24
    shapes = {"q/k/v/o 2048x2048": ((hidden, hidden), 4), "gate/up 5461x2048": ((mlp, hidden), 2),
              "down 2048x5461": ((hidden, mlp), 1)}
    rows, whole = [], {}
    for n in (0, *iterations):
        total = 0.0
        for name, ((out_f, in_f), count) in shapes.items():
            layer = ReLoRALinear(torch.nn.Linear(in_f, out_f, bias=False, device=device), rank, 32.0, 0.0,
                                 FourBitCodec("nf4", 64, True), "exact", init="residual" if n else "zero",
                                 init_iterations=max(n, 1))
            layer.merge_and_reinit()  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for _ in range(2):
                layer.merge_and_reinit()
            sync(device)
            seconds = (time.perf_counter() - t0) / 2
            total += seconds * count * layers
            if name.startswith("gate") and n in (0, 3):
                tracker = StorageTracker()
                for b in layer.base.stored().values():
                    tracker.register(b, "frozen")
                base = tracker.total
                with tracker, tracker.in_phase("merge"):
                    layer.merge_and_reinit()
                rows.append((f"peak temporaries of one 5461x2048 merge{f', then a {n}-alternation split' if n else ''}",
                             f"{(tracker.peak['merge'] - base) / (4 * mlp * hidden):.2f} x the layer in fp32"))
            rows.append((f"one {name} layer: merge" + (f" + split, {n} alternation{'s' if n > 1 else ''}" if n else
                                                       " only (zero start)"), f"{seconds:.3f} s"))
            print(rows[-1], flush=True)
        whole[n] = total
    flops = sum(split_flops(*shape, rank) * count * layers for shape, count in shapes.values())
    summary = [(f"whole 1.3B model ({7 * layers} layers): merge only (zero start)", f"{whole[0]:.1f} s")]
    for n in iterations:
        summary.append((f"whole 1.3B model: merge + split, {n} alternation{'s' if n > 1 else ''}",
                        f"{whole[n]:.1f} s ({whole[n] - whole[0]:+.1f} s); {n * flops / 1e12:.1f} TFLOP of SVD work"))
    return rows + summary, flops


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-model", action="store_true", help="skip the whole-1.3B merge timing")
    ap.add_argument("--residual", action="store_true", help="time residual starts at the 1.3B shape instead")
    ap.add_argument("--results", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.residual:
        rows, flops = residual_times(device)
        body = ["| 1.3B shape, NF4 exact, rank 128 | measured |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows],
                "", f"One alternation's SVD work over the 168 layers: {flops / 1e12:.2f} TFLOP (12 m n q + 2 m n r per "
                "layer, q = rank + 10: tools/bench_merge.py split_flops). A GPU running fp32 matmuls at 50 TFLOP/s "
                f"would take about {flops / 50e12:.2f} s per alternation for it, on top of its quantize and merge "
                "time (an estimate: not measured on a GPU)."]
        print("\n".join(body))
        command = f"python tools/bench_merge.py --residual --device {device.type}"
        record(Path(args.results), f"Residual start at the 1.3B shape on {machine(device)}", command, machine(device),
               body)
        return

    lines = ["| storage | merge | share of intended update stored | added noise / update |", "|---|---|---|---|"]
    for fmt, make in FORMATS.items():
        for mode in MERGE_MODES:
            share, noise = survival(make(), mode, device)
            lines.append(f"| {fmt} | {mode} | {share:.3f} | {noise:.2f} |")
            print(lines[-1], flush=True)
    times = ["| merge | seconds |", "|---|---|"]
    for name, seconds in merge_times(device, args.skip_model):
        times.append(f"| {name} | {seconds:.3f} |")
        print(times[-1], flush=True)

    command = f"python tools/bench_merge.py --device {device.type}{' --skip-model' if args.skip_model else ''}"
    record(Path(args.results), f"Merge benchmark on {machine(device)}", command, machine(device), [
        "2048x2048 Gaussian weight (std 0.02), 20 merges of rank-16 updates with RMS 1% of the weight's.",
        "", *lines, "", "Merge wall time, NF4 with double quantization:", "", *times])


if __name__ == "__main__":
    main()
