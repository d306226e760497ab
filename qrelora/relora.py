"""ReLoRA adapter layers: a frozen (quantized) base plus a trainable low-rank delta, merged at restarts."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import QuantConfig, ReLoRAConfig
from .models import fresh_init, is_activation_checkpointing
from .quant import Codec, FrozenWeight, LayerMerge, make_codec
from .seeding import derive_seed

# The row norm of A under nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)) has variance 1 / (3 in).
KAIMING_ROW_NORM = 1 / math.sqrt(3)

# The linears of a LLaMA block that carry adapters; embeddings, norms and the head stay full-rank.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ReLoRALinear(nn.Module):
    """y = x W^T + s * B A dropout(x) + bias, with W frozen in its storage format and A, B trainable.

    A is Kaiming-uniform and B zero, so a fresh adapter leaves the layer's function unchanged (and A still
    receives gradient: with both zero, as in the reference code's HEAD, nothing is learnt in the first cycle).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float, codec: Codec,
                 merge: str = "exact", mmap_path: Path | None = None, seed: int = 0, init: str = "zero",
                 init_iterations: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.scale = rank, alpha / rank
        self.init, self.init_iterations = init, init_iterations
        device = linear.weight.device
        self.base = FrozenWeight(linear.weight.data, codec, merge, mmap_path=mmap_path, seed=seed)
        self.bias = nn.Parameter(linear.bias.data.float()) if linear.bias is not None else None
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Inside an activation-checkpointed block the backward reuses the recompute's dequantized weight
        # (see _AdaptedLinearFn); add_adapters sets it from the model's checkpointing.
        self.keep_weight = False
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A fresh adapter, its randomness seeded by the layer and the merges it has had: every data-parallel rank
        draws the same without sharing anything (the global random stream differs between ranks as soon as one
        of them draws a number the others do not), and a resumed run draws what the uninterrupted run drew.

        "zero": A Kaiming-uniform (drawn on the CPU, so CUDA and CPU runs draw the same), B zero. "residual":
        s * B @ A = L, the low-rank part split off the full-precision weight W together with the stored codes
        (FrozenWeight.split_off_low_rank), which keeps W - L as its full-precision weight. The layer then starts
        at W, and a merge folds s * B @ A into W - L: exactly W plus what the adapter learned since its start,
        with nothing to remember but the weight the merge mode keeps anyway."""
        seed = derive_seed(self.base.seed, self.base.merges_done, "adapter init")
        if self.init == "residual":
            u, v = self.base.split_off_low_rank(self.rank, self.init_iterations, seed)
            # A: the residual's top right singular vectors at the row norm of a Kaiming-uniform A (1/sqrt(3));
            # B the rest, small as the residual is. The adapter then learns as one that starts at zero does
            # (its gradients scale with A and B), only from the residual instead of from nothing.
            self.lora_A.copy_(v.t() * KAIMING_ROW_NORM)
            self.lora_B.copy_(u / (KAIMING_ROW_NORM * self.scale))
            return
        gen = torch.Generator().manual_seed(seed)
        a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device="cpu")
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        self.lora_A.copy_(a)
        nn.init.zeros_(self.lora_B)

    def delta(self) -> Tensor:
        """The adapter's current update s * B @ A (fp32)."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The weight the layer computes with in full precision, in host memory: the merge mode's full-precision
        weight plus the adapter (what export writes, and what the rank probes follow)."""
        return self.base.full_precision() + self.delta().cpu()

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # cast once for the frozen and the adapter GEMMs
            x = x.to(torch.get_autocast_dtype(x.device.type))
        dropped = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else None
        y = _AdaptedLinearFn.apply(x, dropped, self.base, self.lora_A, self.lora_B, self.scale, self.keep_weight)
        if self.bias is not None:
            y = y + self.bias
        return y

    @torch.no_grad()
    def merge_and_reinit(self) -> LayerMerge:
        """Fold s*B@A into the base, then start a fresh adapter. Returns merge statistics."""
        stats = self.base.merge(self.delta())  # the only reference, so the merge can free it early
        self.reset_adapter()
        return stats

    def logical_numel(self) -> int:
        return self.base.numel()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, "
                f"storage={self.base.codec.name}, merge={self.base.merge_mode}")


class _AdaptedLinearFn(torch.autograd.Function):
    """y = x W^T + s (x' A^T) B^T for a frozen stored W, in x's dtype; x' is dropout(x), or x itself (None).

    One function for the whole layer: the adapter's term is added by the GEMM itself (`addmm_` into the frozen
    product) in the forward and into the input gradient in the backward, s multiplies only rank-sized tensors,
    and x is cast to the autocast dtype once. Autograd over separate ops would scale and sum full-size products
    in both passes, cast x twice and keep more full-size temporaries alive (measured: 20% less activation
    memory at the 60M shape, and a 5% faster step of the tiny recipe on CPU; benchmarks/RESULTS.md).

    The frozen weight: without activation checkpointing only a reference to the packed weight is saved, and the
    backward dequantizes again, so no full-size copy of W outlives the forward pass. Inside a checkpointed block
    (`keep_weight`) the dequantized W is saved instead: the checkpoint drops it after the first forward, and the
    recompute that runs just before the block's backward saves it again, so the backward reuses it (two
    dequantizations per micro-batch instead of three, for one block's weights of extra memory while that block
    runs backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, dropped: Tensor | None, frozen: FrozenWeight, lora_A: Tensor, lora_B: Tensor,
                scale: float, keep_weight: bool) -> Tensor:
        dtype = x.dtype
        w = frozen.dequantize(dtype)
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        source = x2 if dropped is None else dropped.reshape(x2.shape)
        h = source @ a.t()
        y = x2 @ w.t()
        y.addmm_(h, b.t(), alpha=scale)
        ctx.frozen, ctx.scale, ctx.x_shape, ctx.dropped = frozen, scale, x.shape, dropped is not None
        ctx.param_dtype = lora_A.dtype
        ctx.save_for_backward(source, h, a, b, *([w] if keep_weight else []))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        source, h, a, b, *kept = ctx.saved_tensors
        need_x, need_dropped, _, need_a, need_b, _, _ = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(source.dtype)
        gb = g @ b  # rank-sized, like every tensor that s multiplies
        grad_a = (gb.t() @ source).mul_(ctx.scale).to(ctx.param_dtype) if need_a else None
        grad_b = (g.t() @ h).mul_(ctx.scale).to(ctx.param_dtype) if need_b else None
        grad_x = grad_dropped = None
        if need_x:
            w = kept[0] if kept else ctx.frozen.dequantize(source.dtype)
            grad_x = g @ w
            if not ctx.dropped:
                grad_x.addmm_(gb, a, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.dropped and need_dropped:
            grad_dropped = (gb @ a).mul_(ctx.scale).view(ctx.x_shape)
        return grad_x, grad_dropped, None, grad_a, grad_b, None, None


def dense_dtype_for(training_dtype: str) -> torch.dtype:
    """16-bit storage keeps the base in bf16, or in fp32 when training in fp32 (the exact reference)."""
    return torch.bfloat16 if training_dtype == "bf16" else torch.float32


def codec_for(quant: QuantConfig, training_dtype: str = "bf16") -> Codec:
    return make_codec(quant, dense_dtype_for(training_dtype))


def target_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The attention and MLP linears that ReLoRA replaces, with their names."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
            yield name, module


def add_adapters(model: nn.Module, relora: ReLoRAConfig, quant: QuantConfig, *, training_dtype: str = "bf16",
                 mmap_dir: Path | None = None, seed: int = 0, device: torch.device | str | None = None,
                 codec: Codec | None = None, fill: Callable[[str, nn.Module], None] | None = None) -> list[ReLoRALinear]:
    """Replace every attention / MLP linear with a ReLoRALinear, one layer at a time.

    With `device` set, each linear is moved there just before it is quantized, so a model held in host
    memory is converted on the GPU with one fp32 layer of accelerator workspace (a 7B model in fp32 does
    not fit a 24 GB card; its NF4 form does). Linears still on the meta device are given storage there
    instead, one at a time, and filled by `fill(name, linear)`: initialised as in a fresh model by default, or
    read from a checkpoint (see `models.materialize`). `codec` replaces the recipe's storage format (the memory
    estimator passes one that only lays out tensors)."""
    codec = codec or codec_for(quant, training_dtype)
    checkpointed = is_activation_checkpointing(model)
    fill = fill or fresh_init(model)
    # Names only: holding the modules in a list would keep every replaced fp32 weight alive until the end.
    names = [name for name, _ in target_linears(model)]
    layers = []
    for i, name in enumerate(names):
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if linear.weight.is_meta:  # a model built on the meta device: this layer's tensors now, in place
            linear.to_empty(device=device or "cpu")
            fill(name, linear)
        elif device is not None:
            linear.to(device)
        mmap_path = (mmap_dir / f"{name}.f32") if (mmap_dir is not None and quant.master == "mmap") else None
        layer = ReLoRALinear(linear, relora.rank, relora.alpha, relora.dropout, codec, quant.merge,
                             mmap_path=mmap_path, seed=derive_seed(seed, i, "adapter layer"), init=relora.init,
                             init_iterations=relora.init_iterations)
        layer.keep_weight = checkpointed
        setattr(parent, child, layer)
        del linear
        layers.append(layer)
    return layers


@contextlib.contextmanager
def unquantized(model: nn.Module) -> Iterator[bool]:
    """Inside, every adapted layer computes with its weight as it was before quantizing (the exact merges'
    master, or the stored weight plus the error-feedback residual), copied to the device layer by layer: what
    the model would do without 4-bit storage. Yields whether the merge mode keeps that weight (stochastic and
    naive merges keep nothing, so the layers then compute as quantized)."""
    layers = adapter_layers(model)
    knows = bool(layers) and all(layer.base.mode.keeps_full_precision for layer in layers)
    for layer in layers:
        layer.base.unquantized = knows
    try:
        yield knows
    finally:
        for layer in layers:
            layer.base.unquantized = False


def adapter_layers(model: nn.Module) -> list[ReLoRALinear]:
    return [m for m in model.modules() if isinstance(m, ReLoRALinear)]


def rank_probe_indices(n_layers: int) -> list[int]:
    """The first, middle and last of n adapted layers: the few whose accumulated update the merges report the
    effective rank of (the paper's central claim), from a copy of their weights at the switch."""
    return sorted({0, n_layers // 2, n_layers - 1}) if n_layers else []


def rank_probe_layers(model: nn.Module) -> dict[str, ReLoRALinear]:
    """The rank-probe layers (rank_probe_indices) by name."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ReLoRALinear)]
    return dict(layers[i] for i in rank_probe_indices(len(layers)))


@dataclass
class MergeReport:
    seconds: float
    layers: int
    update_ratio: float
    """Mean ||s*B@A|| / ||W|| over layers."""
    codes_changed: float
    """Share of stored base-weight codes the merge changed (mean over layers)."""


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> MergeReport:
    """Merge every adapter of the model into its base and re-initialise it."""
    t0 = time.perf_counter()
    stats = [layer.merge_and_reinit() for layer in adapter_layers(model)]
    # Autocast caches the bf16 casts of parameters until its outermost region exits; a merge inside such
    # a region would otherwise go on seeing the adapters' pre-merge values.
    torch.clear_autocast_cache()
    n = max(len(stats), 1)
    return MergeReport(
        seconds=time.perf_counter() - t0,
        layers=len(stats),
        update_ratio=sum(s.update_ratio for s in stats) / n,
        codes_changed=sum(s.codes_changed for s in stats) / n,
    )


@torch.no_grad()
def frozen_checksum(model: nn.Module, chunk: int = 1 << 24) -> Tensor:
    """A cheap fingerprint of every frozen weight's stored tensors (codes and statistics), computed where they
    live: the sum of their bytes and a position-weighted sum (weights 1..65521 cycling), as two int64. Equal on
    every data-parallel rank after a merge unless the ranks drifted apart; reading it needs no copy to the host
    and no temporary larger than `chunk` values."""
    layers = adapter_layers(model)
    device = layers[0].base.device if layers else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.int64, device=device)
    for layer in layers:
        for t in layer.base.stored().values():
            data = t.detach().reshape(-1).view(torch.uint8)
            for start in range(0, data.numel(), chunk):
                values = data[start:start + chunk].to(torch.int64)
                weights = (torch.arange(start, start + values.numel(), device=device) % 65521) + 1
                total[0] += values.sum()
                total[1] += (values * weights).sum()
    return total


def release_host_pages(model: nn.Module) -> None:
    """Unmap from this process the pages of memory-mapped masters that a checkpoint save or load touched (see
    quant.HostTensor.release_pages)."""
    for layer in adapter_layers(model):
        if layer.base.host is not None:
            layer.base.host.release_pages()


def frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(accelerator-resident bytes of all frozen base weights, their number of parameters)."""
    layers = adapter_layers(model)
    return sum(l.base.packed_bytes() for l in layers), sum(l.base.numel() for l in layers)
