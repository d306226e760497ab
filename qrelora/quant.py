"""Storage of frozen weights (bitsandbytes 4-bit / 8-bit codes, or plain 16-bit) and the merge modes.

A `Codec` turns a full-precision matrix into a dict of packed tensors and back. `FrozenWeight` holds one
packed matrix as buffers, plus whatever its merge mode needs off the accelerator (the exact master copy or
the rounding residual), and folds adapter updates into itself with `merge`.

Why the merge modes exist (measured, see README): requantizing `dequantize(W_q) + delta` loses every part
of `delta` smaller than a quantization step, and most of each late-training update is that small.
"exact" keeps a full-precision master in host memory and stores `quantize(master)`; "error_feedback"
keeps only the rounding residual; "stochastic" rounds without bias and keeps nothing; "naive" is the
counter-example.
"""

from __future__ import annotations

import logging
import math
import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .seeding import derive_seed

_bnb_functional = None


def bnb_functional():
    """bitsandbytes.functional, imported on first use with its CPU start-up noise silenced."""
    global _bnb_functional
    if _bnb_functional is None:
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        # Paged optimizers warn on their first CPU step that they fall back to ordinary memory: nothing a
        # user can act on.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as F
        _bnb_functional = F
    return _bnb_functional


# --------------------------------------------------------------------------------------------------
# Codecs


STORAGE_FORMATS: dict[tuple[int, str | None], type[Codec]] = {}
"""The storage formats a recipe can choose, keyed by (quant.bits, quant.type); type None: any type."""


def storage_format(bits: int, quant_type: str | None = None):
    """Class decorator: make a codec the storage of quant.bits = bits (and quant.type = quant_type)."""
    def register(cls: type[Codec]) -> type[Codec]:
        STORAGE_FORMATS[(bits, quant_type)] = cls
        return cls
    return register


def storage_class(quant) -> type[Codec]:
    """The codec class that a recipe's [quant] section (bits, type) selects."""
    return STORAGE_FORMATS.get((quant.bits, quant.type)) or STORAGE_FORMATS[(quant.bits, None)]


def make_codec(quant, dense_dtype: torch.dtype = torch.bfloat16) -> Codec:
    """The codec of a recipe's [quant] section; dense_dtype is the training dtype's 16-bit storage."""
    return storage_class(quant).for_recipe(quant, dense_dtype)


class Codec:
    """Packs a 2-D float matrix into tensors and back. Subclasses define the storage format."""

    name = "codec"
    label = "codec"
    """How the banner names the storage."""
    blocksizes: tuple[int, ...] = ()
    """The quant.blocksize values it supports (none: it has no blocks)."""
    default_blocksize = 0
    """What quant.blocksize = 0 means."""

    @classmethod
    def for_recipe(cls, quant, dense_dtype: torch.dtype) -> Codec:
        """The codec for a recipe's [quant] section (bits, type, blocksize, double_quant)."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def dequantize(self, packed: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def quantize_stochastic(self, w: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def layout(self, shape: torch.Size) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The packed tensors `quantize` makes for a matrix of this shape: name -> (shape, dtype), without
        quantizing anything (the memory estimator lays out a 7B model from this)."""
        raise NotImplementedError

    def changed(self, old: dict[str, Tensor], new: dict[str, Tensor]) -> int:
        """How many stored values differ between two packings of the same matrix (without unpacking them
        into a full-size integer tensor: this runs on the accelerator during a merge)."""
        key = self.main_key
        return int((old[key] != new[key]).sum())


@storage_format(16)
class DenseCodec(Codec):
    """Plain 16-bit (or fp32) storage: the unquantized ReLoRA reference."""

    main_key = "weight"
    label = "16-bit"

    @classmethod
    def for_recipe(cls, quant, dense_dtype):
        return cls(dense_dtype)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]

    def quantize(self, w):
        # Always a copy: the stored weight must never alias the caller's tensor (e.g. an fp32 master on the
        # same device), or a later in-place merge would change both.
        return {"weight": w.to(self.dtype, copy=True).contiguous()}

    def layout(self, shape):
        return {"weight": (tuple(shape), self.dtype)}

    def dequantize(self, packed, shape, dtype):
        return packed["weight"].to(dtype)

    def quantize_stochastic(self, w, generator):
        if self.dtype != torch.bfloat16:
            return self.quantize(w)
        # bf16 is fp32 with the low 16 bits cut: adding uniform noise to those bits before cutting rounds
        # up with probability equal to the discarded fraction, i.e. without bias.
        bits = w.float().contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device="cpu", dtype=torch.int32)
        rounded = ((bits + noise.to(bits.device)) & ~0xFFFF).view(torch.float32)
        return {"weight": rounded.to(torch.bfloat16)}


class CodebookCodec(Codec):
    """Blockwise absmax quantization to a 16- or 256-entry code (bitsandbytes layouts).

    Dequantization is `code[index] * scale[block]`. bitsandbytes' kernels do it fast on CUDA and on CPU
    when rows are whole blocks; otherwise it runs here in plain torch, which also avoids the CPU kernel's
    wrong results when in_features is a multiple of 16 but not of the blocksize (bitsandbytes 0.50 on an
    AVX-512 CPU, e.g. in_features 96 or 352 with blocksize 64).
    """

    blocksize: int
    code: Tensor

    def indices(self, packed) -> Tensor:
        raise NotImplementedError

    def scales(self, packed) -> Tensor:
        raise NotImplementedError

    def pack_indices(self, idx: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def dequantize_reference(self, packed, shape, dtype):
        code = packed["code"].to(torch.float32)
        values = code[self.indices(packed)]
        n = values.numel()
        pad = (-n) % self.blocksize
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        out = values.view(-1, self.blocksize) * self.scales(packed)[:, None]
        return out.view(-1)[:n].view(shape).to(dtype)

    def quantize_stochastic(self, w, generator):
        """Round each value to one of its two neighbouring code points, up with probability equal to the
        distance travelled: E[dequantize(q)] = w inside each block's range."""
        packed = self.quantize(w)
        scales = self.scales(packed)
        flat = w.float().reshape(-1)
        n = flat.numel()
        pad = (-n) % self.blocksize
        v = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.blocksize) / scales.clamp_min(1e-30)[:, None]
        v = v.view(-1)[:n].clamp(-1, 1)
        code = packed["code"].to(torch.float32)
        sorted_code, order = torch.sort(code)
        lo = (torch.searchsorted(sorted_code, v, right=True) - 1).clamp(0, len(code) - 2)
        lo_val, hi_val = sorted_code[lo], sorted_code[lo + 1]
        p_up = ((v - lo_val) / (hi_val - lo_val).clamp_min(1e-12)).clamp(0, 1)
        u = torch.rand(n, generator=generator, device="cpu").to(v.device)
        pos = lo + (u < p_up).long()
        return self.pack_indices(order[pos], packed)


@storage_format(4, "nf4")
@storage_format(4, "fp4")
class FourBitCodec(CodebookCodec):
    """NF4 / FP4, two codes per byte (high nibble first), optional double quantization of the scales."""

    main_key = "packed"
    blocksizes = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    default_blocksize = 64

    @classmethod
    def for_recipe(cls, quant, dense_dtype):
        return cls(quant.type, quant.blocksize or cls.default_blocksize, quant.double_quant)

    @property
    def label(self) -> str:
        return self.quant_type.upper()

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True):
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.name = quant_type

    def quantize(self, w):
        F = bnb_functional()
        q, st = F.quantize_4bit(w.contiguous(), blocksize=self.blocksize, quant_type=self.quant_type,
                                compress_statistics=self.double_quant)
        packed = {"packed": q, "absmax": st.absmax, "code": st.code}
        if st.nested:
            packed |= {"nested_absmax": st.state2.absmax, "nested_code": st.state2.code,
                       "offset": st.offset.reshape(1)}
        return packed

    def layout(self, shape):
        n = math.prod(shape)
        blocks = -(-n // self.blocksize)
        out = {"packed": (((n + 1) // 2, 1), torch.uint8), "code": ((16,), torch.float32)}
        if not self.double_quant:
            return out | {"absmax": ((blocks,), torch.float32)}
        # Double quantization: the per-block scales become 8-bit codes in blocks of 256 (bitsandbytes).
        return out | {"absmax": ((blocks,), torch.uint8), "nested_absmax": ((-(-blocks // 256),), torch.float32),
                      "nested_code": ((256,), torch.float32), "offset": ((1,), torch.float32)}

    def _quant_state(self, packed, shape, dtype):
        F = bnb_functional()
        nested = None
        if "nested_absmax" in packed:
            nested = F.QuantState(absmax=packed["nested_absmax"], code=packed["nested_code"],
                                  blocksize=256, dtype=torch.float32)
        return F.QuantState(absmax=packed["absmax"], shape=shape, code=packed["code"], blocksize=self.blocksize,
                            quant_type=self.quant_type, dtype=dtype,
                            offset=packed["offset"][0] if nested is not None else None, state2=nested)

    def dequantize(self, packed, shape, dtype):
        if packed["packed"].is_cuda or shape[-1] % self.blocksize == 0:
            return bnb_functional().dequantize_4bit(packed["packed"], self._quant_state(packed, shape, dtype))
        return self.dequantize_reference(packed, shape, dtype)

    def scales(self, packed):
        if "nested_absmax" not in packed:
            return packed["absmax"].float()
        nested_absmax = packed["nested_absmax"].float()
        values = packed["nested_code"].float()[packed["absmax"].long()]
        n = values.numel()
        values = torch.nn.functional.pad(values, (0, (-n) % 256)).view(-1, 256) * nested_absmax[:, None]
        return values.view(-1)[:n] + packed["offset"].float()

    def changed(self, old, new):
        diff = old["packed"] ^ new["packed"]
        return int(((diff & 0xF0) != 0).sum() + ((diff & 0x0F) != 0).sum())

    def indices(self, packed):
        flat = packed["packed"].view(-1)
        return torch.stack([flat >> 4, flat & 15], dim=1).view(-1).long()

    def pack_indices(self, idx, like):
        if idx.numel() % 2:
            idx = torch.nn.functional.pad(idx, (0, 1))
        pairs = idx.view(-1, 2).to(torch.uint8)
        return like | {"packed": ((pairs[:, 0] << 4) | pairs[:, 1]).view(like["packed"].shape)}


@storage_format(8)
class EightBitCodec(CodebookCodec):
    """8-bit blockwise with bitsandbytes' *linear signed* code. The default dynamic code is asymmetric
    (-0.993 .. +1.0) and shrinks weights ~0.7% per requantization (measured with bitsandbytes 0.50); the linear
    one is symmetric."""

    name = label = "int8"
    main_key = "codes"
    blocksizes = (64, 128, 256, 512, 1024, 2048, 4096)
    default_blocksize = 256

    @classmethod
    def for_recipe(cls, quant, dense_dtype):
        return cls(quant.blocksize or cls.default_blocksize)

    def __init__(self, blocksize: int = 256):
        self.blocksize = blocksize
        self._code = None

    def quantize(self, w):
        F = bnb_functional()
        if self._code is None or self._code.device != w.device:
            self._code = F.create_linear_map(signed=True).to(w.device)
        q, st = F.quantize_blockwise(w.contiguous(), code=self._code, blocksize=self.blocksize)
        return {"codes": q, "absmax": st.absmax, "code": st.code}

    def layout(self, shape):
        blocks = -(-math.prod(shape) // self.blocksize)
        return {"codes": (tuple(shape), torch.uint8), "absmax": ((blocks,), torch.float32),
                "code": ((256,), torch.float32)}

    def dequantize(self, packed, shape, dtype):
        if packed["codes"].is_cuda:
            F = bnb_functional()
            st = F.QuantState(absmax=packed["absmax"], code=packed["code"], blocksize=self.blocksize,
                              dtype=torch.float32)
            return F.dequantize_blockwise(packed["codes"], quant_state=st).view(shape).to(dtype)
        return self.dequantize_reference(packed, shape, dtype)

    def scales(self, packed):
        return packed["absmax"].float()

    def indices(self, packed):
        return packed["codes"].view(-1).long()

    def pack_indices(self, idx, like):
        return like | {"codes": idx.to(torch.uint8).view(like["codes"].shape)}


class LayoutCodec(Codec):
    """Stands in for a codec under FakeTensorMode (for the memory tool and the disk check): `quantize` lays out
    exactly the tensors the real codec would store, `dequantize` makes the full-size matrix the real one would
    make."""

    def __init__(self, codec: Codec):
        self.codec, self.name, self.main_key = codec, codec.name, codec.main_key

    def quantize(self, w):
        return {name: torch.empty(shape, dtype=dtype, device=w.device)
                for name, (shape, dtype) in self.codec.layout(w.shape).items()}

    def quantize_stochastic(self, w, generator):
        return self.quantize(w)

    def dequantize(self, packed, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=next(iter(packed.values())).device)

    def layout(self, shape):
        return self.codec.layout(shape)


# --------------------------------------------------------------------------------------------------
# The frozen weight and its merges

class HostTensor:
    """A tensor kept off the accelerator: in host memory, or in a memory-mapped file (7B-class
    masters are larger than many desktops' RAM; the page cache then holds only what a merge touches)."""

    def __init__(self, value: Tensor, mmap_path: Path | None = None, dtype: torch.dtype = torch.float32):
        value = value.detach().to("cpu", dtype)
        self._map: mmap.mmap | None = None
        if mmap_path is None:
            self.tensor = value.clone()
            return
        # Written through the file, then mapped: writing into the mapping would keep every page of every master
        # mapped into this process (resident) until the kernel needs the memory back.
        mmap_path.parent.mkdir(parents=True, exist_ok=True)
        with open(mmap_path, "w+b") as f:
            f.write(value.contiguous().view(torch.uint8).numpy())  # the bytes as they are, no copy
            f.flush()
            self._map = mmap.mmap(f.fileno(), 0)  # shared: writes reach the file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about any buffer it cannot make read-only; this is writable
            self.tensor = torch.frombuffer(self._map, dtype=dtype).view(value.shape)

    def release_pages(self) -> None:
        """Unmap from this process the pages of a memory-mapped tensor that a merge touched. They stay in the page
        cache (dirty ones are written back to the file) and come back on the next touch; unmapped, they no longer
        count as this process's resident memory, which would otherwise grow to the whole master (24 GiB for 7B)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)


class MergeMode:
    """How adapter updates are folded into a stored weight at a restart (recipe key quant.merge).

    A mode may keep one tensor off the accelerator (`host_dtype`, reported by the memory tool under
    `host_category`); `workspace` is the peak of its temporaries on the device during a merge, in units of
    the layer's fp32 size, by device type: measured on CPU with `qrelora memory --measure` on the 60M shape
    (NF4 and int8; that moment also holds the effective-rank report of one layer), and on CUDA for the
    exact merge of a 1.3B MLP layer on an H200 (1.38); the other modes' CUDA figures are the CPU ones.
    """

    name: str
    host_dtype: torch.dtype | None = None
    host_category: str | None = None
    host_mappable = False
    """Whether the host tensor may live in a memory-mapped file (quant.master = "mmap")."""
    keeps_full_precision = False
    """Whether full_precision() is the weight before quantizing (the master, or stored + residual)."""
    split_workspace: dict[str, float] = {}
    """Like `workspace`, for a merge followed by a residual start (FrozenWeight.split_off_low_rank), by device
    type: measured on CPU for one 5461 x 2048 layer at rank 128 (the StorageTracker's peak over the stored
    codes); the CUDA figures are the CPU ones."""
    workspace: dict[str, float]

    def host_value(self, w: Tensor, frozen: FrozenWeight) -> Tensor | None:
        """What the mode keeps on the host for the weight w that `frozen` now stores."""
        return None

    def merge(self, frozen: FrozenWeight, update: list[Tensor]) -> float:
        """Fold the update into frozen's stored weight (and host tensor); return ||W|| after the merge.

        `update` holds the only reference to the delta, so a mode can free it as soon as it is used."""
        raise NotImplementedError

    def full_precision(self, frozen: FrozenWeight) -> Tensor:
        """The best full-precision value of the weight that the mode knows, in host memory."""
        return frozen.dequantize(torch.float32).cpu()

    def keep_full_precision(self, frozen: FrozenWeight, w: Tensor) -> None:
        """Make w (on the device) the full-precision weight the mode keeps, frozen's codes being already stored
        (only the modes that keep one: keeps_full_precision)."""
        raise NotImplementedError


class ExactMerge(MergeMode):
    """An fp32 master in host memory takes every update; the device holds quantize(master)."""

    name, host_dtype, host_category, host_mappable = "exact", torch.float32, "master copy", True
    keeps_full_precision = True
    split_workspace = {"cpu": 3.4, "cuda": 3.4}
    workspace = {"cpu": 2.4, "cuda": 1.4}

    def host_value(self, w, frozen):
        return w

    def merge(self, frozen, update):
        master = frozen.host.tensor
        master.add_(update.pop().to(master.device, torch.float32))  # freed before the master comes back
        frozen.store(frozen.codec.quantize(master.to(frozen.device)))
        norm = master.norm().item()
        frozen.host.release_pages()
        return norm

    def full_precision(self, frozen):
        return frozen.host.tensor.clone()

    def keep_full_precision(self, frozen, w):
        frozen.host.tensor.copy_(w)
        frozen.host.release_pages()


class ErrorFeedbackMerge(MergeMode):
    """Only the rounding residual is kept: bf16 holds it (below one quantization step) to ~3 significant
    digits at half the host memory of a master copy."""

    name, host_dtype, host_category = "error_feedback", torch.bfloat16, "residual"
    keeps_full_precision = True
    split_workspace = {"cpu": 4.1, "cuda": 4.1}
    workspace = {"cpu": 5.0, "cuda": 5.0}

    def host_value(self, w, frozen):
        return w - frozen.dequantize(torch.float32)

    def merge(self, frozen, update):
        target = frozen.dequantize(torch.float32).add_(update.pop()).add_(frozen.host.tensor.to(frozen.device))
        norm = target.norm().item()
        frozen.store(frozen.codec.quantize(target))
        frozen.host.tensor.copy_(target.sub_(frozen.dequantize(torch.float32)))
        return norm

    def full_precision(self, frozen):
        return frozen.dequantize(torch.float32).cpu() + frozen.host.tensor.float()

    def keep_full_precision(self, frozen, w):
        frozen.host.tensor.copy_(w - frozen.dequantize(torch.float32))


class StochasticMerge(MergeMode):
    """Unbiased rounding of dequantize(W) + delta, nothing kept. Seeded by layer and merge count, so every
    data-parallel rank draws the same rounding."""

    name = "stochastic"
    workspace = {"cpu": 13.5, "cuda": 13.5}

    def merge(self, frozen, update):
        target = frozen.dequantize(torch.float32).add_(update.pop())
        gen = torch.Generator().manual_seed(derive_seed(frozen.seed, frozen.merges_done, "stochastic rounding"))
        frozen.store(frozen.codec.quantize_stochastic(target, gen))
        return target.norm().item()


class NaiveMerge(MergeMode):
    """Requantize dequantize(W) + delta in place: loses every part of delta below a quantization step (the
    counter-example the other modes exist for)."""

    name = "naive"
    workspace = {"cpu": 4.0, "cuda": 4.0}

    def merge(self, frozen, update):
        target = frozen.dequantize(torch.float32).add_(update.pop())
        frozen.store(frozen.codec.quantize(target))
        return target.norm().item()


MERGE_MODES: dict[str, MergeMode] = {m.name: m for m in (ExactMerge(), ErrorFeedbackMerge(), StochasticMerge(),
                                                          NaiveMerge())}


@dataclass
class LayerMerge:
    """What one merge did to one weight."""

    update_ratio: float
    """||delta|| / ||W|| after the merge."""
    codes_changed: float
    """Share of the stored codes that changed."""


class FrozenWeight(nn.Module):
    """One frozen matrix in its storage format, merged into by `merge(delta)`.

    The packed tensors are buffers (they move with the model and appear in its state_dict under their own
    names, so a state_dict restores the exact codes and statistics). The master copy or residual is not a
    buffer, because it must stay in host memory when the model moves to the GPU; it is added to the
    state_dict by hand.
    """

    def __init__(self, weight: Tensor, codec: Codec, merge: str = "exact", mmap_path: Path | None = None,
                 seed: int = 0):
        super().__init__()
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {tuple(MERGE_MODES)}, got {merge!r}")
        self.codec, self.mode = codec, MERGE_MODES[merge]
        self.shape = weight.shape
        self.seed = seed
        self.merges_done = 0
        self.unquantized = False  # relora.unquantized: compute with full_precision() instead of the codes
        w = weight.detach().float()
        self.store(codec.quantize(w))
        self.host: HostTensor | None = None
        if self.mode.host_dtype is not None:
            self.host = HostTensor(self.mode.host_value(w, self), mmap_path if self.mode.host_mappable else None,
                                   self.mode.host_dtype)

    @property
    def merge_mode(self) -> str:
        return self.mode.name

    def store(self, packed: dict[str, Tensor]) -> None:
        """Replace the packed tensors (codes and statistics)."""
        for name, t in packed.items():
            if name in self._buffers and self._buffers[name].shape == t.shape:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def stored(self) -> dict[str, Tensor]:
        """The packed tensors (codes and statistics) by name."""
        return dict(self._buffers)

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.unquantized:
            return self.full_precision().to(self.device, dtype)
        return self.codec.dequantize(self.stored(), self.shape, dtype)

    def numel(self) -> int:
        return math.prod(self.shape)

    def packed_bytes(self) -> int:
        """Bytes this weight occupies on its device (codes and statistics)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @torch.no_grad()
    def merge(self, delta: Tensor) -> LayerMerge:
        """Fold `delta` (same shape, any float dtype, on the weight's device) into the stored weight.

        Pass the only reference to `delta` (e.g. `merge(adapter.delta())`): the exact mode moves it to the
        host and frees it before the master comes back, so a merge needs one fp32 matrix of accelerator
        workspace on top of the packed weight.
        """
        old = self.stored()
        delta_norm = delta.float().norm().item()
        update = [delta]
        del delta
        w_norm = self.mode.merge(self, update)
        self.merges_done += 1
        return LayerMerge(update_ratio=delta_norm / max(w_norm, 1e-12),
                          codes_changed=self.codec.changed(old, self.stored()) / self.numel())

    def full_precision(self) -> Tensor:
        """The best full-precision value this weight knows: the master, stored + residual, or stored."""
        return self.mode.full_precision(self)

    @torch.no_grad()
    def split_off_low_rank(self, rank: int, iterations: int, seed: int) -> tuple[Tensor, Tensor]:
        """Store codes Q and return a rank-r L = U @ V^T (as U, V, on the weight's device; V's columns orthonormal)
        chosen together so that
        dequantize(Q) + L is close to the full-precision weight W (LoftQ, Li et al. 2023, arXiv 2310.08659): each
        alternation quantizes W - L, then fits L to what that quantization lost by a randomized SVD. W - L becomes
        the weight the merge mode keeps, so an adapter starting at L computes W, and a merge of the adapter adds
        to it exactly what it learned since (see ReLoRALinear.reset_adapter)."""
        if not self.mode.keeps_full_precision:
            raise ValueError(f"a low-rank split needs the full-precision weight, which quant.merge = "
                             f"{self.mode.name!r} does not keep")
        w = self.full_precision().to(self.device)
        low = None  # at most three full-size fp32 temporaries at once: w, low and one more
        for i in range(iterations):
            packed = self.codec.quantize(w if low is None else w.sub(low))
            lost = self.codec.dequantize(packed, self.shape, torch.float32).neg_().add_(w)
            u, sigma, v = top_singular(lost, rank, derive_seed(seed, i, "low-rank split"))
            del lost
            u = u * sigma
            low = None
            low = u @ v.t()
        self.store(packed)
        self.mode.keep_full_precision(self, w.sub_(low))
        return u, v


    # The host-side tensor travels in the state_dict under "host" so checkpoints restore it exactly.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.host is not None:
            destination[prefix + "host"] = self.host.tensor
        destination[prefix + "merges_done"] = torch.tensor(self.merges_done)
        destination[prefix + "seed"] = torch.tensor(self.seed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = dict(self._buffers) | ({"host": self.host.tensor} if self.host is not None else {})
        mismatched = [name for name, t in expected.items()
                      if prefix + name in state_dict and state_dict[prefix + name].shape != t.shape]
        for name in mismatched:
            error_msgs.append(f"{prefix + name}: checkpoint shape {tuple(state_dict[prefix + name].shape)} != "
                              f"{tuple(expected[name].shape)} (a checkpoint of another model shape or quantization "
                              "setting)")
        if mismatched:
            return
        if self.host is not None:
            key = prefix + "host"
            if key in state_dict:
                self.host.tensor.copy_(state_dict[key])
            elif strict:
                missing_keys.append(key)
        if prefix + "merges_done" in state_dict:
            self.merges_done = int(state_dict[prefix + "merges_done"])
        if prefix + "seed" in state_dict:
            self.seed = int(state_dict[prefix + "seed"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for extra in ("host", "merges_done", "seed"):
            if prefix + extra in unexpected_keys:
                unexpected_keys.remove(prefix + extra)


def top_singular(m: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `rank` singular triplets (U, S, V) of m by torch's randomized SVD (Halko et al. 2011), its random
    projection drawn from `seed`: every data-parallel rank, and a resumed run, draws the same."""
    devices = list(range(torch.cuda.device_count())) if m.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(rank + 10, *m.shape), niter=2)
    return u[:, :rank], s[:rank], v[:, :rank]
