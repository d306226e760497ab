"""How much memory a recipe needs, and with what micro-batch it fits: estimated, and measured.

The estimate does not use rules of thumb. It builds the recipe's model under torch's FakeTensorMode, where
every tensor has its real shape, dtype and device but holds no data, converts it to ReLoRA form with the
real layer code (the frozen weights laid out exactly as their codec would store them), and runs one
micro-batch forward and backward, with the recipe's autocast and activation checkpointing, under a
`StorageTracker` that follows every tensor storage from creation to release. The peak of live bytes, split
by what each storage is, gives the weights, gradients, activations and logits. What no tensor of the step
shows is added from the optimizer's storage format (`OptimizerKind.state_bytes`), the merge's known
temporaries (`merge_workspace_bytes`) and, on CUDA, the allocator's reserve and the CUDA context.

`measure` runs real training steps (one merge included) of the same recipe and records the peak of each
phase: on CUDA from torch's allocator statistics, with a memory snapshot written to the run directory; on
CPU from the same tracker following the real tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import Recipe
from .data import load_tokenizer
from .device import build_device_for, check_device, device_type
from .models import build_model, enable_activation_checkpointing, resolve_shape
from .monitor import PlainLog
from .optim import OPTIMIZERS, resolve_optimizer_name
from .quant import MERGE_MODES, Codec, FrozenWeight
from .relora import ReLoRALinear, add_adapters, codec_for
from .train import Trainer

GiB = 2**30

# CUDA figures no tensor shows. The allocator's reserve is the measured ratio of reserved to allocated
# memory of a full-rank 1.3B run on an H200 (16.22 / 14.12 GiB, benchmarks/RESULTS.md). The context
# (kernels, cuBLAS workspace) is an assumption, usually 0.3-0.6 GiB; tools/measure_gpu.py records it.
ALLOCATOR_RESERVE = 0.15
CUDA_CONTEXT_BYTES = GiB // 2

DEVICE_CATEGORIES = (
    "frozen weights", "adapters", "full-rank weights", "gradients", "optimizer states", "activations",
    "logits and loss", "optimizer step workspace", "merge workspace", "build workspace", "allocator reserve",
    "CUDA context")
HOST_CATEGORIES = ("master copy", "residual", "rank-probe copies", "fp32 model while building")


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '20000MiB', '1.5T' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size: write it like 24GiB, 24GB or 20000MiB")
    number, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not prefix:
        return int(number)
    return int(number * (1024 if binary else 1000) ** ("KMGT".index(prefix) + 1))


# --------------------------------------------------------------------------------------------------
# Following tensor storages


class StorageTracker(TorchDispatchMode):
    """Live bytes of every tensor storage it has been shown, and their peak in each phase.

    Storages are registered with a category (`register`) or, for the outputs of every op run while the
    tracker is active, with the current `category` (tensors whose last dimension is the vocabulary are
    "logits and loss"). An output that shares storage with an input (a view, an in-place op) is not new
    memory and is not counted. A storage leaves the count when torch frees it.
    """

    def __init__(self, vocab_size: int = 0):
        super().__init__()
        self.vocab_size = vocab_size
        # Storage keys (the address of the storage) are reused once a storage is freed, so each tracked
        # storage also gets a serial number; snapshots are by serial number.
        self.live: dict[int, tuple[int, int, str]] = {}
        """Storage key -> (serial, bytes, category)."""
        self._serial = 0
        self.total = 0
        self.phase = "idle"
        self.category = "activations"
        self.peak: dict[str, int] = {}
        self.at_peak: dict[str, dict[int, tuple[int, str]]] = {}
        """Phase -> serial -> (bytes, category) of the storages live at the phase's peak."""
        self._rising = False

    def register(self, t: Tensor, category: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0 or t.is_meta:  # meta tensors own no memory
            return
        self._serial += 1
        self.live[key] = (self._serial, storage.nbytes(), category)
        self.total += storage.nbytes()
        weakref.finalize(storage, self._free, key, self._serial)
        if self.total > self.peak.get(self.phase, -1):
            self.peak[self.phase] = self.total
            self._rising = True

    def _snapshot(self) -> dict[int, tuple[int, str]]:
        return {serial: (nbytes, category) for serial, nbytes, category in self.live.values()}

    def _free(self, key: int, serial: int) -> None:
        if key not in self.live or self.live[key][0] != serial:
            return
        if self._rising:  # the total is about to fall from a local maximum: remember what made it
            self.at_peak[self.phase] = self._snapshot()
            self._rising = False
        self.total -= self.live.pop(key)[1]

    @contextlib.contextmanager
    def in_phase(self, phase: str, category: str | None = None):
        """Peaks inside the block are the phase's; new storages get `category` (default: activations)."""
        previous = self.phase, self.category
        self.phase, self.category = phase, category or "activations"
        if self.total > self.peak.get(phase, -1):
            self.peak[phase] = self.total
            self._rising = True
        try:
            yield
        finally:
            if self._rising:
                self.at_peak[self.phase] = self._snapshot()
                self._rising = False
            self.phase, self.category = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in inputs:
                vocab = self.vocab_size and t.ndim >= 2 and t.shape[-1] == self.vocab_size
                self.register(t, "logits and loss" if vocab and self.category == "activations" else self.category)
        return out

    def by_category(self, phase: str, roles: dict[int, str] | None = None) -> dict[str, int]:
        """Bytes by category at the phase's peak. `roles` (storage key -> category, from `roles_of`) names
        what the storages still alive are now, overriding the category they were created with (a
        gradient is born as the output of an op of the backward)."""
        now = {self.live[key][0]: category for key, category in (roles or {}).items() if key in self.live}
        out: dict[str, int] = {}
        for serial, (nbytes, category) in self.at_peak.get(phase, {}).items():
            category = now.get(serial, category)
            out[category] = out.get(category, 0) + nbytes
        return out


def _storages_by_role(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, list[Tensor]] | None = None) -> dict[int, tuple[Tensor, str]]:
    """Storage key -> (one tensor on it, what it is) for the model's, the optimizer's and `extra` tensors."""
    found: dict[int, tuple[Tensor, str]] = {}

    def put(t: Tensor | None, category: str) -> None:
        if isinstance(t, Tensor) and t.untyped_storage().nbytes():
            found.setdefault(t.untyped_storage()._cdata, (t, category))

    for module in model.modules():
        if isinstance(module, FrozenWeight):
            for b in module.buffers(recurse=False):
                put(b, "frozen weights")
            if module.host is not None:
                put(module.host.tensor, module.mode.host_category)
        elif isinstance(module, ReLoRALinear):
            put(module.lora_A, "adapters")
            put(module.lora_B, "adapters")
    for p in model.parameters():
        put(p.grad, "gradients")
        put(p, "full-rank weights")
    for b in model.buffers():
        put(b, "full-rank weights")
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                put(t, "optimizer states")
    for category, tensors in (extra or {}).items():
        for t in tensors:
            put(t, category)
    return found


def roles_of(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             extra: dict[str, list[Tensor]] | None = None) -> dict[int, str]:
    """What each of the model's and optimizer's storages (and `extra` ones, by category) is, by storage key."""
    return {key: category for key, (_, category) in _storages_by_role(model, optimizer, extra).items()}


def register_all(tracker: StorageTracker, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    for t, category in _storages_by_role(model, optimizer).values():
        tracker.register(t, category)


def bytes_by_role(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, category in _storages_by_role(model, optimizer).values():
        out[category] = out.get(category, 0) + t.untyped_storage().nbytes()
    return out


# --------------------------------------------------------------------------------------------------
# What no tensor of a forward / backward shows


def merge_workspace_bytes(layers: list[ReLoRALinear], merge: str, device_type: str) -> int:
    """Device temporaries of the merge moment (layers are merged one at a time, after the step's gradients
    are freed): the fp32 update s*B@A, the master or dequantized target, the new codes next to the old."""
    if not layers:
        return 0
    largest = max(layer.base.numel() for layer in layers)
    return int(MERGE_MODES[merge].workspace[device_type] * 4 * largest)


class LayoutCodec(Codec):
    """Stands in for a codec under FakeTensorMode: `quantize` lays out exactly the tensors the real codec
    would store, `dequantize` makes the full-size matrix the real one would make."""

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
# The estimate


@dataclass
class Simulation:
    """One micro-batch forward and backward of the recipe's model, run on fake tensors."""

    static: dict[str, int]
    """Bytes by category of the weights, gradients and host copies."""
    forward: dict[str, int]
    """Live bytes by category at the forward's peak (static included)."""
    backward: dict[str, int]
    trainable: list[Tensor]
    layers: list[ReLoRALinear]
    fp32_model_bytes: int


def _fake_model(recipe: Recipe, vocab_size: int, depth: int | None) -> nn.Module:
    """The recipe's model (with `depth` decoder blocks instead of its own, if given)."""

    if not recipe.model.init_from:
        cfg = recipe.model
        if depth:
            s = resolve_shape(cfg)
            cfg = dataclasses.replace(cfg, preset="custom", hidden_size=s.hidden_size, num_heads=s.num_heads,
                                      mlp_size=s.mlp_size, num_layers=depth)
        return build_model(cfg, vocab_size=vocab_size, seq_len=recipe.data.seq_len, device="cpu")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(recipe.model.init_from)
    config.use_cache = False
    config.num_hidden_layers = depth or config.num_hidden_layers
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class Simulator:
    """The recipe's model on fake tensors, in full-rank or ReLoRA form, ready to run micro-batches.

    With gradient accumulation the worst micro-batch is a later one, whose backward adds into gradients
    that already exist; without it, gradients appear during the backward as activations are freed.
    """

    def __init__(self, recipe: Recipe, vocab_size: int, relora: bool, checkpointing: bool, depth: int | None = None):
        from torch._subclasses.fake_tensor import FakeTensorMode


        self.recipe, self.vocab_size = recipe, vocab_size
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            self.model = _fake_model(recipe, vocab_size, depth)
            self.depth = self.model.config.num_hidden_layers
            self.fp32_model_bytes = sum(p.numel() * 4 for p in self.model.parameters())
            if checkpointing:
                enable_activation_checkpointing(self.model)
            self.layers = []
            if relora:
                codec = LayoutCodec(codec_for(recipe.quant, recipe.training.dtype))
                self.layers = add_adapters(self.model, recipe.relora, recipe.quant,
                                           training_dtype=recipe.training.dtype, codec=codec)
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
            if recipe.training.grad_accum > 1:
                for p in self.trainable:
                    p.grad = torch.zeros_like(p)
            self.static = bytes_by_role(self.model)
            self.static["gradients"] = sum(p.numel() * p.element_size() for p in self.trainable)

    def run(self, micro_batch: int) -> Simulation:
        bf16 = self.recipe.training.dtype == "bf16"
        with self.mode:
            if self.recipe.training.grad_accum == 1:
                for p in self.trainable:
                    p.grad = None
            tracker = StorageTracker(self.vocab_size)
            register_all(tracker, self.model)
            batch = torch.zeros((micro_batch, self.recipe.data.seq_len), dtype=torch.long)
            self.model.train()
            with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                with tracker.in_phase("forward"):
                    loss = self.model(input_ids=batch, labels=batch).loss
                with tracker.in_phase("backward"):
                    loss.backward()
                    del loss
            roles = roles_of(self.model)
        return Simulation(self.static, tracker.by_category("forward", roles), tracker.by_category("backward", roles),
                          self.trainable, self.layers, self.fp32_model_bytes)


@dataclass
class PhaseEstimate:
    """One phase of a run (full-rank warm start, ReLoRA): device bytes by category at each moment of a step."""

    name: str
    parts: dict[str, dict[str, int]]
    """Moment (build, forward, backward, optimizer step, merge) -> category -> device bytes."""
    after_build: dict[str, int]
    """Device bytes by category once the model is built (weights only)."""
    workspaces: dict[str, int]
    """Transient categories, whether or not they are part of the peak moment."""
    activations: dict[bool, int]
    """Activations + logits at the peak of forward/backward, with (True) and without (False) checkpointing."""
    host: dict[str, int]
    paged: int
    """Optimizer-state bytes in CUDA managed (paged) memory, which torch's allocator does not count."""

    @property
    def moments(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self.parts.items()}

    @property
    def peak_moment(self) -> str:
        moments = self.moments
        return max(moments, key=moments.get)

    @property
    def device(self) -> dict[str, int]:
        return self.parts[self.peak_moment]

    @property
    def need(self) -> int:
        return self.moments[self.peak_moment]

    def tensor_bytes(self, moment: str) -> int:
        """What a measurement sees at this moment: tensors in torch's allocator (no CUDA context, no
        allocator reserve, no paged optimizer states)."""
        parts = self.after_build if moment == "after build" else self.parts.get(moment)
        if parts is None:
            return 0
        paged = self.paged if "optimizer states" in parts else 0
        return sum(v for k, v in parts.items() if k not in ("allocator reserve", "CUDA context")) - paged


@dataclass
class Estimate:
    recipe: str
    device_type: str
    micro_batch_size: int
    seq_len: int
    vocab_size: int
    vocab_source: str
    optimizer: str
    checkpointing: bool
    budget: int
    phases: list[PhaseEstimate]
    seconds: float = 0.0

    @property
    def device_need(self) -> int:
        return max(p.need for p in self.phases)

    @property
    def host_need(self) -> int:
        """Host memory at the run's busiest moment (on CPU the device is host memory too): building, or
        training with whatever the merges keep in host memory."""
        building = max(p.host.get("fp32 model while building", 0) for p in self.phases)
        training = max(sum(v for k, v in p.host.items() if "disk" not in k and "building" not in k)
                       for p in self.phases)
        return max(building, training)

    @property
    def need(self) -> int:
        """What has to fit the budget: device memory, plus host memory when the device is the CPU."""
        return self.device_need + (self.host_need if self.device_type == "cpu" else 0)

    @property
    def fits(self) -> bool:
        return self.need <= self.budget

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p, phase in zip(d["phases"], self.phases):
            p |= {"need": phase.need, "peak_moment": phase.peak_moment, "device": phase.device,
                  "moments": phase.moments}
            p["activations"] = {"checkpointing_on": phase.activations.get(True),
                                "checkpointing_off": phase.activations.get(False)}
        return d | {"device_need": self.device_need, "host_need": self.host_need, "need": self.need, "fits": self.fits,
                    "headroom": 1 - self.need / self.budget}


def _phases_of(recipe: Recipe) -> list[tuple[str, bool]]:
    r, steps = recipe.relora, recipe.training.steps
    if not r.enabled:
        return [("full-rank", False)]
    relora = (f"ReLoRA (steps {r.warm_start_steps:,}-{steps:,})", True)
    warm = [(f"full-rank warm start (steps 0-{r.warm_start_steps:,})", False)] if r.warm_start_steps else []
    return warm + [relora]


class Estimator:
    """Estimates of one recipe at any micro-batch size (each fake model is built once)."""

    def __init__(self, recipe: Recipe, vocab_size: int, budget: int, vocab_source: str = "", recipe_name: str = ""):

        self.recipe, self.vocab_size, self.budget = recipe, vocab_size, budget
        self.vocab_source, self.recipe_name = vocab_source, recipe_name
        self.device_type = device_type(recipe)
        self.optimizer = resolve_optimizer_name(recipe.optim, self.device_type)
        self._simulators: dict[tuple, Simulator] = {}

    def simulator(self, relora: bool, checkpointing: bool, depth: int | None = None) -> Simulator:
        key = (relora, checkpointing, depth)
        if key not in self._simulators:
            self._simulators[key] = Simulator(self.recipe, self.vocab_size, relora, checkpointing, depth)
        return self._simulators[key]

    def estimate(self, micro_batch: int | None = None, compare_checkpointing: bool = True) -> Estimate:
        """Device and host memory of every phase of the recipe. The activations with checkpointing switched
        the other way come from models of depth 1 and 2 (decoder blocks are identical, so they grow by the
        same bytes per block)."""
        t0 = time.perf_counter()
        r = self.recipe
        micro_batch = micro_batch or r.training.micro_batch_size
        checkpointing = r.training.activation_checkpointing
        phases = []
        for i, (name, relora) in enumerate(_phases_of(r)):
            sim = self.simulator(relora, checkpointing).run(micro_batch)
            phase = _phase(r, name, sim, self.optimizer, self.device_type, self.budget, first=i == 0)
            phase.activations[checkpointing] = _activations(sim)
            if compare_checkpointing:
                one, two = (_activations(self.simulator(relora, not checkpointing, d).run(micro_batch)) for d in (1, 2))
                depth = self.simulator(relora, checkpointing).depth
                phase.activations[not checkpointing] = one + (depth - 1) * (two - one)
            phases.append(phase)
        return Estimate(self.recipe_name, self.device_type, micro_batch, r.data.seq_len, self.vocab_size,
                        self.vocab_source, self.optimizer, checkpointing, self.budget, phases,
                        seconds=time.perf_counter() - t0)

    def largest_micro_batch(self, at: Estimate, limit: int = 4096) -> int:
        """The largest micro-batch whose estimate fits the budget (0 if not even one sequence does).

        Every moment of a step needs a + b * micro_batch bytes (activations grow linearly with it), so the
        estimate at one sequence and `at` give each moment's line (on CPU next to the host memory, which the
        micro-batch does not change); the answer is checked with one more estimate and, if the lines were
        optimistic, one sequence less is tried before a bisection (each estimate of a 1.3B model takes
        seconds)."""

        def estimate(m: int) -> Estimate:
            return at if m == at.micro_batch_size else self.estimate(m, compare_checkpointing=False)

        m0 = at.micro_batch_size if at.micro_batch_size > 1 else 2
        low, high = estimate(1), estimate(m0)
        if low.need > self.budget:
            return 0
        host = low.need - low.device_need  # host memory counted against the budget (on CPU), fixed
        best = limit
        for p_low, p_high in zip(low.phases, high.phases):
            for moment, a in p_low.moments.items():
                slope = (p_high.moments[moment] - a) / (m0 - 1)
                if slope > 0:
                    best = min(best, 1 + int((self.budget - host - a) // slope))
        m = max(best, 1)
        if m == 1 or estimate(m).need <= self.budget:
            return m
        if estimate(m - 1).need <= self.budget:  # the usual miss: the lines round one sequence high
            return m - 1
        fits, too_big = 1, m - 1
        while too_big - fits > 1:
            mid = (fits + too_big) // 2
            fits, too_big = (mid, too_big) if estimate(mid).need <= self.budget else (fits, mid)
        return fits


def _device_part(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if k not in HOST_CATEGORIES and v}


def _activations(s: Simulation) -> int:
    """Activations + logits at the peak of forward / backward."""
    return max(s.forward.get("activations", 0) + s.forward.get("logits and loss", 0),
               s.backward.get("activations", 0) + s.backward.get("logits and loss", 0))


def _phase(recipe: Recipe, name: str, sim: Simulation, optimizer: str, device_type: str, budget: int,
           first: bool) -> PhaseEstimate:
    opt = {"optimizer states": OPTIMIZERS[optimizer].state_bytes(sim.trainable)}
    static = _device_part(sim.static)
    workspaces = {"optimizer step workspace": OPTIMIZERS[optimizer].step_workspace(sim.trainable, device_type)}
    candidates = {
        "forward": _device_part(sim.forward) | opt,
        "backward": _device_part(sim.backward) | opt,
        "optimizer step": static | opt | workspaces,
    }
    if sim.layers:
        workspaces["merge workspace"] = merge_workspace_bytes(sim.layers, recipe.quant.merge, device_type)
        candidates["merge"] = {k: v for k, v in static.items() if k != "gradients"} | opt | {
            "merge workspace": workspaces["merge workspace"]}
    # Building, where the trainer builds (train.build_device_for): whole in fp32 on the device, or layer by
    # layer from the meta device (one fp32 layer at a time, quantized at once), or in host memory.
    host: dict[str, int] = {}
    if first:

        if device_type != "cuda" or recipe.model.init_from:  # as Trainer._build_device: whole, in host memory
            where = torch.device("cpu")
        else:
            where = build_device_for(sim.fp32_model_bytes, budget, bool(sim.layers), torch.device(device_type))
        if where.type == device_type:
            candidates["build"] = {"full-rank weights": sim.fp32_model_bytes}
        elif where.type == "meta":
            largest = max(layer.base.numel() for layer in sim.layers)
            candidates["build"] = {k: v for k, v in static.items() if k != "gradients"} | {
                "build workspace": int(MERGE_MODES["exact"].workspace["cuda"] * 4 * largest)}
        else:
            host["fp32 model while building"] = sim.fp32_model_bytes
    for key in ("master copy", "residual"):
        if sim.static.get(key):
            where = " (mmap file on disk)" if key == "master copy" and recipe.quant.master == "mmap" else ""
            host[key + where] = sim.static[key]
    if sim.layers:  # three layers' starting weights, to report the rank of what the merges add
        picks = sorted({0, len(sim.layers) // 2, len(sim.layers) - 1})
        host["rank-probe copies"] = sum(4 * sim.layers[i].base.numel() for i in picks)
    paged = opt["optimizer states"] if device_type == "cuda" and optimizer.startswith("paged") else 0
    if device_type == "cuda":
        for parts in candidates.values():
            allocated = sum(parts.values()) - (paged if "optimizer states" in parts else 0)
            parts["allocator reserve"] = int(ALLOCATOR_RESERVE * allocated)
            parts["CUDA context"] = CUDA_CONTEXT_BYTES
    after_build = {k: v for k, v in static.items() if k != "gradients"}
    return PhaseEstimate(name, candidates, after_build, workspaces, {}, host, paged)


# --------------------------------------------------------------------------------------------------
# Measuring real steps

MOMENTS = ("after build", "forward", "backward", "optimizer step", "merge")


@dataclass
class Measurement:
    """Measured peaks of real training steps, by training phase and moment of the step."""

    device_type: str
    steps: int
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    """Training phase -> moment -> peak bytes (CUDA: allocated)."""
    reserved: dict[str, dict[str, int]] = field(default_factory=dict)
    """CUDA only: training phase -> moment -> peak reserved bytes."""
    categories: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """CPU only: training phase -> moment -> bytes by category at that moment's peak."""
    tokens_per_s: float = 0.0
    snapshot: str | None = None

    def record(self, phase: str, moment: str, peak: int, reserved: int | None = None,
               categories: dict[str, int] | None = None) -> None:
        if peak >= self.peaks.setdefault(phase, {}).get(moment, -1):
            self.peaks[phase][moment] = peak
            if categories is not None:
                self.categories.setdefault(phase, {})[moment] = categories
        if reserved is not None:
            self.reserved.setdefault(phase, {})[moment] = max(reserved, self.reserved.get(phase, {}).get(moment, 0))


def _measurement_recipe(recipe: Recipe, steps: int) -> Recipe:
    """The recipe cut to `steps` steps with the same phases: half of them full-rank when it has a warm
    start, then one ReLoRA cycle ending in a merge. No evaluation beyond one batch, no checkpoints."""
    r, t = recipe.relora, recipe.training
    warm = steps // 2 if r.enabled and r.warm_start_steps else 0
    return dataclasses.replace(
        recipe,
        run=dataclasses.replace(recipe.run, output_dir=str(recipe.run_dir / "memory"), tensorboard=False),
        training=dataclasses.replace(t, steps=steps, warmup_steps=0, eval_every=0, log_every=steps),
        relora=dataclasses.replace(r, warm_start_steps=warm, restart_every=steps - warm, restart_warmup=0),
        data=dataclasses.replace(recipe.data, eval_tokens=t.micro_batch_size * recipe.data.seq_len),
        checkpoint=dataclasses.replace(recipe.checkpoint, every=0, resume="never"),
    )


class _CudaPhases:
    """Peak allocated / reserved memory of each marked part of a step, from torch's CUDA statistics."""

    def __init__(self, measurement: Measurement, trainer):
        self.m, self.trainer = measurement, trainer

    @contextlib.contextmanager
    def __call__(self, moment: str):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        self.m.record(_training_phase(self.trainer), moment, torch.cuda.max_memory_allocated(),
                      torch.cuda.max_memory_reserved())


class _TrackedPhases:
    """Peak live tensor bytes of each marked part of a step, by category, from a StorageTracker."""

    CATEGORY = {"optimizer step": "optimizer step workspace", "merge": "merge workspace"}

    def __init__(self, measurement: Measurement, trainer, tracker: StorageTracker):
        self.m, self.trainer, self.tracker = measurement, trainer, tracker

    @contextlib.contextmanager
    def __call__(self, moment: str):
        phase = _training_phase(self.trainer)
        key = f"{phase}: {moment}"
        self.tracker.peak.pop(key, None)
        self.tracker.at_peak.pop(key, None)
        with self.tracker.in_phase(key, self.CATEGORY.get(moment)):
            yield
        relora = self.trainer.relora
        probes = [start for _, start in relora.rank_probes.values()] if relora.active else []
        roles = roles_of(self.trainer.unwrapped, self.trainer.optimizer, {"rank-probe copies": probes})
        self.m.record(phase, moment, self.tracker.peak[key], categories=self.tracker.by_category(key, roles))


def _training_phase(trainer) -> str:
    return "ReLoRA" if trainer.relora.active else "full-rank"


def measure(recipe: Recipe, steps: int, log=None) -> Measurement:
    """Run `steps` real training steps of the recipe (one merge included) and record each moment's peak.

    On CUDA the allocator's peaks are read and a memory snapshot (open it at pytorch.org/memory_viz) is
    written to <run dir>/memory/memory_snapshot.pickle, also when the run goes out of memory. On CPU a
    StorageTracker follows every real tensor."""
    check_device(recipe)
    r = _measurement_recipe(recipe, steps)
    cuda = device_type(r) == "cuda"
    m = Measurement("cuda" if cuda else "cpu", steps)
    snapshot = r.run_dir / "memory_snapshot.pickle"
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = Trainer(r, log or PlainLog(sys.stderr))  # stdout stays for the report (--json)
        if cuda:
            m.record(_training_phase(trainer), "after build", torch.cuda.memory_allocated(),
                     torch.cuda.memory_reserved())
            trainer.phases = _CudaPhases(m, trainer)
            tracking = contextlib.nullcontext()
        else:
            tracker = StorageTracker(len(trainer.tokenizer))
            register_all(tracker, trainer.unwrapped, trainer.optimizer)
            m.record(_training_phase(trainer), "after build", tracker.total,
                     categories=bytes_by_role(trainer.unwrapped, trainer.optimizer))
            trainer.phases = _TrackedPhases(m, trainer, tracker)
            tracking = tracker
        timed = []
        with tracking:
            while trainer.state.step < steps:
                record = trainer.step()
                if record is not None and trainer.state.step > 1:  # the first step pays for lazy initialisation
                    timed.append(record.seconds)
        m.tokens_per_s = len(timed) * r.tokens_per_step / sum(timed) if timed else 0.0
    finally:  # out of memory included: the snapshot shows what filled the card
        if trainer is not None:
            trainer.close()  # frees the run directory's lock
        if cuda:
            _dump_snapshot(snapshot)
            m.snapshot = str(snapshot)
    return m


def _dump_snapshot(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


# --------------------------------------------------------------------------------------------------
# Vocabulary, comparison and output

ASSUMED_VOCAB = 32000  # the LLaMA / ReLoRA-paper vocabulary


def vocab_size_of(recipe: Recipe, given: int | None = None) -> tuple[int, str]:
    """The vocabulary size (it sets the embeddings, the head and the logits) and where it came from.
    A hub tokenizer is read from the local cache only; when it is not there the LLaMA size is assumed,
    and said, rather than waiting on the network."""

    if given:
        return given, "--vocab-size"
    if recipe.model.init_from:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(recipe.model.init_from).vocab_size, recipe.model.init_from
    spec = recipe.data.tokenizer
    if spec == "sample" or Path(spec).expanduser().is_dir():
        return len(load_tokenizer(spec)), spec
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(spec, local_files_only=True)), spec
    except Exception:  # noqa: BLE001 - not cached (or not a tokenizer): assume, and say so
        return ASSUMED_VOCAB, f"assumed: {spec} is not in the local cache; set it with --vocab-size N"


def comparison(e: Estimate, m: Measurement) -> list[dict]:
    """Estimated next to measured bytes for every measured moment; the error is relative to the measured
    peak of the run (the figure a budget is about)."""
    top = max(v for d in m.peaks.values() for v in d.values())
    rows = []
    for phase, moments in m.peaks.items():
        est_phase = next(p for p in e.phases if p.name.startswith(phase))
        for moment in MOMENTS:
            if moment not in moments:
                continue
            host = sum(v for k, v in m.categories.get(phase, {}).get(moment, {}).items() if k in HOST_CATEGORIES)
            measured = moments[moment] - host
            estimated = est_phase.tensor_bytes(moment)
            rows.append({"phase": phase, "moment": moment, "estimated": estimated, "measured": measured,
                         "reserved": m.reserved.get(phase, {}).get(moment),
                         "error": (estimated - measured) / top})
    return rows


def category_comparison(e: Estimate, m: Measurement) -> dict[str, dict]:
    """CPU measurements: for each training phase, estimated and measured bytes by category at the phase's
    measured peak moment, with the error relative to the run's measured peak."""
    top = max(v for d in m.peaks.values() for v in d.values())
    out = {}
    for phase, moments in m.peaks.items():
        moment = max(moments, key=moments.get)
        est_phase = next(p for p in e.phases if p.name.startswith(phase))
        est = est_phase.after_build if moment == "after build" else est_phase.parts[moment]
        meas = m.categories.get(phase, {}).get(moment, {})
        names = [c for c in DEVICE_CATEGORIES if est.get(c) or meas.get(c)]
        names += [c for c in HOST_CATEGORIES if meas.get(c)]
        rows = []
        for c in names:
            estimated = est.get(c, est_phase.host.get(c, 0))
            rows.append({"category": c, "estimated": estimated, "measured": meas.get(c, 0),
                         "error": (estimated - meas.get(c, 0)) / top})
        out[phase] = {"moment": moment, "categories": rows}
    return out


MiB = 2**20


def _unit(largest: int) -> tuple[int, str]:
    return (GiB, "GiB") if largest >= GiB else (MiB, "MiB")


def _fmt(n: int | None, unit: int) -> str:
    return "" if n is None else f"{n / unit:.2f}"


NOTES = {
    "frozen weights": "codes and block scales of the frozen linears",
    "adapters": "A and B of every adapted linear, fp32",
    "full-rank weights": "embeddings, norms, head (all weights when full-rank), fp32",
    "gradients": "fp32, one per trainable weight",
    "activations": "saved for backward, and temporaries",
    "logits and loss": "micro-batch x sequence x vocabulary: logits, fp32 copy, log-softmax, gradient",
    "optimizer step workspace": "temporaries of the optimizer step",
    "merge workspace": "merging the largest layer (one layer at a time)",
    "build workspace": "initialising and quantizing the largest layer (built layer by layer)",
    "allocator reserve": f"{ALLOCATOR_RESERVE:.0%} of allocated (measured reserved/allocated ratio)",
    "CUDA context": "assumed: driver state, loaded code, cuBLAS workspace",
    "master copy": "fp32 master of every frozen weight (exact merges)",
    "residual": "bf16 rounding residual (error-feedback merges)",
    "rank-probe copies": "three layers' starting weights (effective-rank report)",
    "fp32 model while building": "the model is initialised in host memory, then quantized layer by layer",
}


def render(e: Estimate, largest: int, m: Measurement | None, console) -> None:
    from rich.table import Table

    r_cpu = e.device_type == "cpu"
    console.print(f"[bold]qrelora memory[/] {e.recipe}")
    console.print(f"{e.device_type}, micro-batch {e.micro_batch_size} x {e.seq_len} tokens, vocabulary "
                  f"{e.vocab_size:,} ({e.vocab_source}), optimizer {e.optimizer}, activation checkpointing "
                  f"{'on' if e.checkpointing else 'off'}")
    unit, unit_name = _unit(e.need)

    def _gib(n: int | None) -> str:
        return _fmt(n, unit)

    table = Table(title=f"{unit_name} at each phase's peak moment; (x) = at another moment, not in the peak",
                  title_justify="left")
    table.add_column("device")
    for p in e.phases:
        table.add_column(p.name.replace(" (", "\n("), justify="right")
    table.add_column("what", style="dim")
    for c in DEVICE_CATEGORIES:
        cells = []
        for p in e.phases:
            if c in p.device:
                cells.append(_gib(p.device[c]))
            elif p.workspaces.get(c) or any(parts.get(c) for parts in p.parts.values()):
                other = max(parts.get(c, 0) for parts in p.parts.values())
                cells.append(f"({_gib(p.workspaces.get(c) or other)})")
            else:
                cells.append("")
        if any(cells):
            note = NOTES.get(c, "")
            if c == "optimizer states":
                note = e.optimizer + (" (paged: can spill to host memory)" if e.optimizer.startswith("paged") else "")
            table.add_row(c, *cells, note)
    flipped = [f"({_gib(p.activations[not e.checkpointing])})" if (not e.checkpointing) in p.activations else ""
               for p in e.phases]
    table.add_row("activations + logits, checkpointing " + ("off" if e.checkpointing else "on"), *flipped,
                  "the other setting, for comparison")
    table.add_row("[bold]device peak", *[f"[bold]{_gib(p.need)}" for p in e.phases], "")
    table.add_row("  at", *[p.peak_moment for p in e.phases], "")
    for c in sorted({k for p in e.phases for k in p.host}):
        table.add_row(f"host: {c}", *[_gib(p.host.get(c)) for p in e.phases], NOTES.get(c.split(" (")[0], ""))
    if console.width < 120:  # the notes would wrap every row into three to six lines
        table.columns.pop()
        table.caption, table.caption_justify = "120 columns or more also show what each row holds", "left"
    console.print(table)
    worst = max(e.phases, key=lambda p: p.need)
    verdict = (f"[green]fits[/], headroom {1 - e.need / e.budget:.0%}" if e.fits else
               f"[red]does NOT fit[/], {(e.need - e.budget) / GiB:.2f} GiB over")
    what = "device + host memory" if r_cpu else "device memory"
    console.print(f"Needs {e.need / GiB:.2f} GiB of {what} (peak: the {worst.peak_moment} of the "
                  f"{worst.name.split(' (')[0]} phase); budget {e.budget / GiB:.2f} GiB: {verdict}.")
    disk = max(sum(v for k, v in p.host.items() if "disk" in k) for p in e.phases)
    if not r_cpu or disk:
        console.print(f"Host memory (tensors): {e.host_need / GiB:.2f} GiB"
                      + (f"; disk: {disk / GiB:.2f} GiB for the memory-mapped master copy." if disk else "."))
    console.print(f"Largest micro-batch that fits {e.budget / GiB:.2f} GiB: "
                  + (f"[bold]{largest}[/] x {e.seq_len} tokens (the recipe has {e.micro_batch_size})." if largest
                     else "none: even one sequence does not fit; see the categories above."))
    console.print(f"[dim]Estimated in {e.seconds:.0f} s by running one micro-batch of the real model on fake tensors."
                  + (" CUDA context assumed; measure on the card with --measure 20." if not r_cpu else "") + "[/]")
    if m is not None:
        render_measurement(e, m, console)


def render_measurement(e: Estimate, m: Measurement, console) -> None:
    from rich.table import Table

    cuda = m.device_type == "cuda"
    unit, unit_name = _unit(max(v for d in m.peaks.values() for v in d.values()))
    source = "torch.cuda peak allocated" if cuda else "live tensor bytes"
    table = Table(title=f"Measured over {m.steps} real steps ({source}), {unit_name}; error relative to the "
                        "measured peak", title_justify="left")
    for col in ["phase", "moment", "estimated", "measured"] + (["reserved"] if cuda else []) + ["error"]:
        table.add_column(col, justify="left" if col in ("phase", "moment") else "right")
    for row in comparison(e, m):
        table.add_row(row["phase"], row["moment"], _fmt(row["estimated"], unit), _fmt(row["measured"], unit),
                      *([_fmt(row["reserved"], unit)] if cuda else []), f"{row['error']:+.1%}")
    console.print(table)
    if not cuda:
        for phase, result in category_comparison(e, m).items():
            t = Table(title=f"By category at the {phase} phase's measured peak ({result['moment']}), {unit_name}",
                      title_justify="left")
            for col in ("category", "estimated", "measured", "error"):
                t.add_column(col, justify="left" if col == "category" else "right")
            for row in result["categories"]:
                t.add_row(row["category"], _fmt(row["estimated"], unit), _fmt(row["measured"], unit),
                          f"{row['error']:+.1%}")
            console.print(t)
    console.print(f"{m.tokens_per_s:,.0f} tokens/s over the steps after the first (measurement overhead included)."
                  + (f" Memory snapshot: {m.snapshot} (open it at https://pytorch.org/memory_viz)."
                     if m.snapshot else ""))


def fix_for(recipe: Recipe, largest: int | None = None) -> str:
    """A concrete change to a recipe that ran out of device memory."""
    t = recipe.training
    if largest == 0:
        return ("Not even a micro-batch of one sequence fits: choose a smaller model (model.preset), a smaller "
                "relora.rank or a shorter data.seq_len"
                + (", or turn on activation checkpointing (--training.activation_checkpointing=true)"
                   if not t.activation_checkpointing else "") + ".")
    if largest and largest < t.micro_batch_size:
        per_step = t.micro_batch_size * t.grad_accum
        micro = max(d for d in range(1, largest + 1) if per_step % d == 0)
        if 2 * micro > largest:
            return (f"Lower the micro-batch to what fits and keep the {per_step} sequences per step with "
                    f"accumulation: --training.micro_batch_size={micro} --training.grad_accum={per_step // micro}.")
        accum = -(-per_step // largest)
        return (f"Lower the micro-batch to what fits and keep about the same sequences per step with accumulation: "
                f"--training.micro_batch_size={largest} --training.grad_accum={accum} ({largest * accum} sequences "
                f"per step instead of {per_step}).")
    if not t.activation_checkpointing:
        return "Turn on activation checkpointing: --training.activation_checkpointing=true."
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        return (f"Halve the micro-batch and double the accumulation: --training.micro_batch_size={half} "
                f"--training.grad_accum={t.grad_accum * 2}.")
    return "Use fewer bits for the frozen weights (--quant.bits=4), a smaller rank, or a shorter seq_len."


def out_of_memory_report(recipe: Recipe, recipe_path: str, overrides: list[str]) -> str:
    """For `train` running out of device memory: what the estimator says about the recipe on this card,
    and what to change."""
    budget = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 24 * GiB
    command = " ".join(["qrelora memory", recipe_path, *overrides, f"--budget {budget / GiB:.0f}GiB"])
    try:
        estimator = Estimator(recipe, vocab_size_of(recipe)[0], budget)
        estimate = estimator.estimate(compare_checkpointing=False)
        largest = estimator.largest_micro_batch(estimate)
    except Exception as e:  # noqa: BLE001 - the advice must not hide the original error
        return f"The memory estimate could not be made ({type(e).__name__}: {e}). Run: {command}"
    worst = max(estimate.phases, key=lambda p: p.need)
    return (f"The estimate for this recipe is {estimate.need / GiB:.2f} GiB at the {worst.peak_moment} of the "
            f"{worst.name.split(' (')[0]} phase, against {budget / GiB:.2f} GiB on this card; the largest "
            f"micro-batch that fits is {largest}. {fix_for(recipe, largest)} Details: {command}")


# --------------------------------------------------------------------------------------------------
# The pre-flight check of `qrelora train`


def available_host_bytes() -> int:
    """Host memory a new run can use: psutil's "available" (free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def device_total_bytes() -> int:
    """All the memory of this process's CUDA device."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def host_parts(estimate: Estimate) -> dict[str, int]:
    """Host-memory bytes by category at their largest over the phases (files on disk left out)."""
    host: dict[str, int] = {}
    for phase in estimate.phases:
        for key, value in phase.host.items():
            if value and "disk" not in key:
                host[key] = max(host.get(key, 0), value)
    return host


def host_fix_for(host: dict[str, int]) -> str:
    """A concrete change for a CUDA run whose host-memory part does not fit."""
    biggest = max(host, key=host.get, default="")
    if biggest == "master copy":
        return ("Keep the exact merges' fp32 master copy in a memory-mapped file in the run directory "
                "(--quant.master=mmap), or keep only the bf16 rounding residual (--quant.merge=error_feedback).")
    if biggest == "residual":
        return "Merge with stochastic rounding, which keeps nothing in host memory (--quant.merge=stochastic)."
    if biggest == "fp32 model while building":
        return ("The fp32 model is built whole in host memory because of the warm start or init_from; start "
                "ReLoRA at step 0 (--relora.warm_start_steps=0) so it is built layer by layer on the GPU, or "
                "choose a smaller model.")
    return "Choose a smaller model, or free host memory."


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def preflight(recipe: Recipe, recipe_path: str, overrides: list[str]) -> str | None:
    """What `qrelora train` checks after the recipe and before anything is built or written: that the
    init_from model has an embedding for every token id of the tokenizer, and that the run's estimated peak
    fits this machine (host memory available now; on CUDA also the device's total memory). Returns the
    refusal as one paragraph (the estimate, what the machine has, what to change), or None.

    It costs one estimate (fake tensors, nothing allocated): about a second for recipes/tiny.toml on a
    2-core CPU, on top of what the trainer's own start-up costs (imports, tokenizer) which it shares."""
    check_device(recipe)  # a CUDA recipe on a machine without CUDA: RecipeError, exit 2
    vocab, source = vocab_size_of(recipe)
    if recipe.model.init_from:
        tokens = len(load_tokenizer(recipe.data.tokenizer))
        if tokens > vocab:
            return (f"{recipe_path}: data.tokenizer = {recipe.data.tokenizer!r} has {tokens:,} entries, but the model "
                    f"in model.init_from = {recipe.model.init_from!r} has embeddings for {vocab:,} (vocab_size in its "
                    f"config.json), so token ids from {vocab:,} up would have none. Use the tokenizer the model was "
                    f"trained with (a directory written by qrelora export holds it: "
                    f"--data.tokenizer={recipe.model.init_from}).")
    on = device_type(recipe)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: ranks on this machine share its RAM
    host_available = available_host_bytes()
    budget = device_total_bytes() if on == "cuda" else host_available // processes
    estimator = Estimator(recipe, vocab, budget, source, recipe_path)
    estimate = estimator.estimate(compare_checkpointing=False)
    worst = max(estimate.phases, key=lambda p: p.need)
    moment = ("building the fp32 model" if worst.peak_moment == "build" else
              f"the {worst.peak_moment} of the {worst.name.split(' (')[0]} phase")
    where = (f"{moment}, micro-batch "
             f"{recipe.training.micro_batch_size} x {recipe.data.seq_len} tokens, {vocab:,}-entry vocabulary"
             + (f", x {processes} processes on this machine" if processes > 1 else ""))
    budget_arg = f"{budget / GiB:.1f}GiB" if budget >= GiB else f"{max(budget // 2**20, 1)}MiB"
    rest = (f"Nothing was trained or written; `{' '.join(['qrelora memory', recipe_path, *overrides])} --budget "
            f"{budget_arg}` itemizes the estimate.")
    if on == "cuda" and estimate.device_need > budget:
        fix = fix_for(recipe, estimator.largest_micro_batch(estimate))
        return (f"{recipe_path}: this run needs an estimated {_size(estimate.device_need)} of GPU memory at its peak "
                f"({where}), but the GPU has {_size(budget)} in all. {fix} {rest}")
    if on != "cuda":
        need = estimate.need * processes
        if need <= host_available:
            return None
        fix = fix_for(recipe, estimator.largest_micro_batch(estimate))
        return (f"{recipe_path}: this run needs an estimated {_size(need)} of host memory at its peak ({where}), but "
                f"this machine has {_size(host_available)} available. {fix} {rest}")
    need = estimate.host_need * processes
    if need <= host_available:
        return None
    host = host_parts(estimate)
    parts = ", ".join(f"{k} {_size(v)}" for k, v in sorted(host.items(), key=lambda kv: -kv[1]))
    return (f"{recipe_path}: besides the GPU, this run needs an estimated {_size(need)} of host memory ({parts}"
            + (f"; x {processes} processes on this machine" if processes > 1 else "")
            + f"), but this machine has {_size(host_available)} available. {host_fix_for(host)} {rest}")
