"""Benchmark of quantized merges: how much of the intended update survives, and what a merge costs.

    python tools/bench_merge.py [--device cpu|cuda] [--skip-model] [--results benchmarks/RESULTS.md]

Part 1 (a synthetic test): a 2048x2048 Gaussian matrix (std 0.02) receives 20 merges of
rank-16 updates whose RMS is 1% of the weight's (a small fraction of a 4-bit quantization step, as late
in training). For each storage format and merge mode it reports the share of the intended total update
that the stored weight actually moved by (projection of stored change onto intended change; 1.0 is
lossless), and the noise the merges added (|stored change - intended| / |intended|).

Part 2: wall time of one merge of a 1.3B-shaped layer (2048x5461, the MLP) and of all 168 adapter layers
of the paper's 1.3B model, NF4 with double quantization, exact mode (master in host memory).
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


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-model", action="store_true", help="skip the whole-1.3B merge timing")
    ap.add_argument("--results", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)

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
