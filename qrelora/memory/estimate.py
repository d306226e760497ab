"""The estimate: how much memory a recipe needs, and with what micro-batch it fits.

The estimate does not use rules of thumb. It builds the recipe's model under torch's FakeTensorMode, where
every tensor has its real shape, dtype and device but holds no data, converts it to ReLoRA form with the
real layer code (the frozen weights laid out exactly as their codec would store them, `LayoutCodec`), and
runs one micro-batch forward and backward, with the recipe's autocast and activation checkpointing, under a
`StorageTracker` that follows every tensor storage from creation to release (`Simulator`). The peak of live
bytes, split by what each storage is, gives the weights, gradients, activations and logits. What no tensor
of the step shows is added from the optimizer's storage format (`OptimizerKind.state_bytes`), the merge's
known temporaries (`merge_workspace_bytes`) and, on CUDA, the allocator's reserve and the CUDA context.
`Estimator` gives the `Estimate` of every phase of the run and the largest micro-batch that fits a budget.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import checkpoint
from ..config import Recipe
from ..data import load_tokenizer, sample_tokenizer_size
from ..device import build_device_for, device_type
from ..loss import use_chunked_loss
from ..models import build_model, enable_activation_checkpointing, resolve_shape
from ..optim import OPTIMIZERS, resolve_optimizer_name
from ..pretrained import read_config
from ..quant import MERGE_MODES, LayoutCodec
from ..relora import ReLoRALinear, add_adapters, codec_for, rank_probe_indices, target_linears
from .tracker import StorageTracker, bytes_by_role, register_all, roles_of

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
READING = "reading init_from"
HOST_CATEGORIES = ("master copy", "residual", "rank-probe copies", "fp32 model while building", READING)


# --------------------------------------------------------------------------------------------------
# What no tensor of a forward / backward shows


def merge_workspace_bytes(layers: list[ReLoRALinear], merge: str, device_type: str, residual: bool = False) -> int:
    """Device temporaries of the merge moment (layers are merged one at a time, after the step's gradients
    are freed): the fp32 update s*B@A, the master or dequantized target, the new codes next to the old; with
    adapters that start from the residual (relora.init), the low-rank split's, whichever is more."""
    if not layers:
        return 0
    largest = max(layer.base.numel() for layer in layers)
    mode = MERGE_MODES[merge]
    units = max(mode.workspace[device_type], mode.split_workspace[device_type] if residual else 0.0)
    return int(units * 4 * largest)


def init_from_tensor_bytes(init_from: str, largest_numel: int) -> int:
    """Host memory of reading a model.init_from checkpoint (pretrained.py): its largest tensor as stored (in
    the dtype its config.json names) plus an fp32 copy of it, one tensor at a time."""
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}
    config = read_config(init_from)
    return largest_numel * (stored.get(config.get("dtype") or config.get("torch_dtype"), 4) + 4)


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
    largest_tensor: int
    """Values in the model's largest weight (embedding, head or a linear), before any conversion."""


def _fake_model(recipe: Recipe, vocab_size: int, depth: int | None) -> nn.Module:
    """The recipe's model (with `depth` decoder blocks instead of its own, if given)."""
    if not recipe.model.init_from:
        cfg = recipe.model
        if depth:
            s = resolve_shape(cfg)
            cfg = dataclasses.replace(cfg, preset="custom", hidden_size=s.hidden_size, num_heads=s.num_heads,
                                      mlp_size=s.mlp_size, num_layers=depth)
        return build_model(cfg, vocab_size=vocab_size, seq_len=recipe.data.seq_len, device="cpu")
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy (about a second): only for init_from

    config = AutoConfig.from_pretrained(recipe.model.init_from)
    config.use_cache = False
    config.num_hidden_layers = depth or config.num_hidden_layers
    return use_chunked_loss(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


class Simulator:
    """The recipe's model on fake tensors, in full-rank or ReLoRA form, ready to run micro-batches.

    With gradient accumulation the worst micro-batch is a later one, whose backward adds into gradients
    that already exist; without it, gradients appear during the backward as activations are freed.
    """

    def __init__(self, recipe: Recipe, vocab_size: int, relora: bool, checkpointing: bool, depth: int | None = None):
        self.recipe, self.vocab_size = recipe, vocab_size
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            self.model = _fake_model(recipe, vocab_size, depth)
            self.depth = self.model.config.num_hidden_layers
            self.fp32_model_bytes = sum(p.numel() * 4 for p in self.model.parameters())
            self.largest_tensor = max(p.numel() for p in self.model.parameters())
            if checkpointing:
                enable_activation_checkpointing(self.model)
            self.layers = []
            if relora:
                codec = LayoutCodec(codec_for(recipe.quant, recipe.training.dtype))
                # Laid out as a zero start (the same tensors; a residual start's SVD would need data).
                self.layers = add_adapters(self.model, dataclasses.replace(recipe.relora, init="zero"), recipe.quant,
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
                          self.trainable, self.layers, self.fp32_model_bytes, self.largest_tensor)


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
    checkpointing: bool = True
    """Whether this phase runs with activation checkpointing (Recipe.checkpointing)."""
    checkpoint_bytes: int = 0
    """Disk bytes of one checkpoint taken in this phase (model state and optimizer state)."""
    released_at_switch: int = 0
    """ReLoRA after a warm start: the warm start's optimizer states of the linears the switch replaces, freed
    before the conversion (paged ones explicitly, optim.release_state: bitsandbytes never frees them)."""

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
    checkpoints_at_once: int = 1
    """Checkpoints on disk at the busiest moment of a fresh run (checkpoint.disk_needed)."""

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
    def master_on_disk(self) -> int:
        """The memory-mapped master copy's files (quant.master = "mmap")."""
        return max(sum(v for k, v in p.host.items() if "disk" in k) for p in self.phases)

    @property
    def checkpoint_bytes(self) -> int:
        """One checkpoint of the phase whose checkpoints are larger."""
        return max(p.checkpoint_bytes for p in self.phases)

    @property
    def disk_need(self) -> int:
        """Disk a fresh run fills: its checkpoints at their busiest moment, each the larger phase's, and the
        memory-mapped master copy."""
        return self.checkpoints_at_once * self.checkpoint_bytes + self.master_on_disk

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
                    "headroom": 1 - self.need / self.budget, "disk_need": self.disk_need}


def _phases_of(recipe: Recipe) -> list[tuple[str, bool]]:
    r, steps = recipe.relora, recipe.training.steps
    if not r.enabled:
        return [("full-rank", False)]
    relora = (f"ReLoRA (steps {r.warm_start_steps:,}-{steps:,})", True)
    warm = [(f"full-rank warm start (steps 0-{r.warm_start_steps:,})", False)] if r.warm_start_steps else []
    return warm + [relora]


class Estimator:
    """Estimates of one recipe at any micro-batch size (each fake model is built once)."""

    def __init__(self, recipe: Recipe, vocab_size: int, budget: int, vocab_source: str = "", recipe_name: str = "",
                 simulators: dict[tuple, Simulator] | None = None):
        """simulators: a cache to share with Estimators of the same recipe that differ only in activation
        checkpointing or micro-batch size (a simulator is keyed by phase, checkpointing and depth)."""
        self.recipe, self.vocab_size, self.budget = recipe, vocab_size, budget
        self.vocab_source, self.recipe_name = vocab_source, recipe_name
        self.device_type = device_type(recipe)
        self.optimizer = resolve_optimizer_name(recipe.optim, self.device_type)
        self._simulators: dict[tuple, Simulator] = {} if simulators is None else simulators
        self._plain: dict[int, Estimate] = {}  # estimates without the checkpointing comparison, by micro-batch

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
        if not compare_checkpointing and micro_batch in self._plain:  # largest_micro_batch and --fit ask again
            return self._plain[micro_batch]
        phases = []
        for i, (name, relora) in enumerate(_phases_of(r)):
            checkpointing = r.checkpointing(relora)
            sim = self.simulator(relora, checkpointing).run(micro_batch)
            phase = _phase(r, name, sim, self.optimizer, self.device_type, self.budget, first=i == 0)
            phase.checkpointing = checkpointing
            phase.checkpoint_bytes = checkpoint.estimate_bytes(self.simulator(relora, checkpointing).model,
                                                               OPTIMIZERS[self.optimizer].state_bytes)
            phase.activations[checkpointing] = _activations(sim)
            if relora and i > 0:
                warm = self.simulator(False, r.checkpointing(False)).model
                phase.released_at_switch = OPTIMIZERS[self.optimizer].state_bytes(
                    [p for _, m in target_linears(warm) for p in m.parameters()])
            if compare_checkpointing:
                one, two = (_activations(self.simulator(relora, not checkpointing, d).run(micro_batch)) for d in (1, 2))
                depth = self.simulator(relora, checkpointing).depth
                phase.activations[not checkpointing] = one + (depth - 1) * (two - one)
            phases.append(phase)
        saves = checkpoint.saves_left(0, r.training.steps, r.checkpoint.every)
        estimate = Estimate(self.recipe_name, self.device_type, micro_batch, r.data.seq_len, self.vocab_size,
                            self.vocab_source, self.optimizer, r.training.activation_checkpointing, self.budget,
                            phases, seconds=time.perf_counter() - t0,
                            checkpoints_at_once=checkpoint.disk_needed(1, r.checkpoint.keep_last, 0, saves))
        if not compare_checkpointing:
            self._plain[micro_batch] = estimate
        return estimate

    def largest_micro_batch(self, at: Estimate, limit: int = 4096) -> int:
        """The largest micro-batch whose estimate fits the budget (0 if not even one sequence does).

        Each moment of a step needs about a + b * micro_batch bytes (activations grow with it), but not
        exactly: which tensor is alive at a moment's peak changes with the micro-batch, so a line through one
        sequence and `at` misses (by 10 sequences for the 1.3B recipe). So the search keeps a bracket, the
        largest micro-batch known to fit and the smallest known not to, and each next guess is where the
        lines through its two nearest estimates cross the budget (on CPU net of the host memory, which the
        micro-batch does not change), pulled inside the bracket; it ends when the bracket closes. Where the
        lines are pessimistic upwards it steps by doubling, and after three guesses it bisects (each estimate
        of a 1.3B model takes seconds)."""
        known: dict[int, Estimate] = {at.micro_batch_size: at}

        def fits(m: int) -> bool:
            if m not in known:
                known[m] = self.estimate(m, compare_checkpointing=False)
            return known[m].need <= self.budget

        if not fits(1):
            return 0
        host = known[1].need - known[1].device_need  # host memory counted against the budget (on CPU), fixed

        def crossing(m1: int, m2: int) -> int:
            """Where the lines through the estimates at m1 < m2 leave the budget (limit if they never do)."""
            best = limit
            for p1, p2 in zip(known[m1].phases, known[m2].phases):
                for moment, a in p1.moments.items():
                    slope = (p2.moments[moment] - a) / (m2 - m1)
                    if slope > 0:
                        best = min(best, m1 + int((self.budget - host - a) // slope))
            return best

        m0 = at.micro_batch_size
        good, bad = (m0, limit + 1) if m0 > 1 and fits(m0) else (1, m0 if m0 > 1 else limit + 1)
        step, guesses = 1, 0
        while bad - good > 1:
            below = [m for m in known if m < good]
            if guesses >= 3 or (bad > limit and not below):
                m = (good + bad) // 2 if bad <= limit else good + step
            else:
                m = crossing(*((good, bad) if bad <= limit else (max(below), good)))
                if m <= good and bad > limit:  # pessimistic upwards: look further by doubling steps
                    m = good + step
            m = min(max(m, good + 1), bad - 1, limit)
            guesses, step = guesses + 1, 2 * step
            good, bad = (m, bad) if fits(m) else (good, m)
        return good


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
        workspaces["merge workspace"] = merge_workspace_bytes(sim.layers, recipe.quant.merge, device_type,
                                                              recipe.relora.init == "residual")
        candidates["merge"] = {k: v for k, v in static.items() if k != "gradients"} | opt | {
            "merge workspace": workspaces["merge workspace"]}
    # Building, where the trainer builds (train.build_device_for): whole in fp32 on the device, or layer by
    # layer from the meta device (one fp32 layer at a time, quantized at once), or in host memory.
    host: dict[str, int] = {}
    if first:
        device = torch.device(device_type)
        if recipe.model.init_from:  # as train.build_run_model: read one tensor at a time, quantized as read
            where = torch.device("meta") if sim.layers else build_device_for(sim.fp32_model_bytes, budget, False, device)
            host[READING] = init_from_tensor_bytes(recipe.model.init_from, sim.largest_tensor)
        else:
            where = build_device_for(sim.fp32_model_bytes, budget, bool(sim.layers), device)
        if where.type == device_type:
            candidates["build"] = {"full-rank weights": sim.fp32_model_bytes}
        elif where.type == "meta":
            largest = max(layer.base.numel() for layer in sim.layers)
            units = max(MERGE_MODES["exact"].workspace[device_type], MERGE_MODES[recipe.quant.merge].split_workspace[
                device_type] if recipe.relora.init == "residual" else 0.0)
            candidates["build"] = {k: v for k, v in static.items() if k != "gradients"} | {
                "build workspace": int(units * 4 * largest)}
        else:
            host["fp32 model while building"] = sim.fp32_model_bytes
    for key in ("master copy", "residual"):
        if sim.static.get(key):
            where = " (mmap file on disk)" if key == "master copy" and recipe.quant.master == "mmap" else ""
            host[key + where] = sim.static[key]
    if sim.layers:  # three layers' starting weights, to report the rank of what the merges add
        host["rank-probe copies"] = sum(4 * sim.layers[i].base.numel() for i in rank_probe_indices(len(sim.layers)))
    paged = opt["optimizer states"] if device_type == "cuda" and optimizer.startswith("paged") else 0
    if device_type == "cuda":
        for parts in candidates.values():
            allocated = sum(parts.values()) - (paged if "optimizer states" in parts else 0)
            parts["allocator reserve"] = int(ALLOCATOR_RESERVE * allocated)
            parts["CUDA context"] = CUDA_CONTEXT_BYTES
    after_build = {k: v for k, v in static.items() if k != "gradients"}
    return PhaseEstimate(name, candidates, after_build, workspaces, {}, host, paged)



# --------------------------------------------------------------------------------------------------
# The vocabulary the estimate is made for

ASSUMED_VOCAB = 32000  # the LLaMA / ReLoRA-paper vocabulary


def vocab_size_of(recipe: Recipe, given: int | None = None) -> tuple[int, str]:
    """The vocabulary size (it sets the embeddings, the head and the logits) and where it came from.
    A hub tokenizer is read from the local cache only; when it is not there the LLaMA size is assumed,
    and said, rather than waiting on the network."""
    if given:
        return given, "--vocab-size"
    if recipe.model.init_from:
        from transformers import AutoConfig  # heavy (about a second): only for init_from

        return AutoConfig.from_pretrained(recipe.model.init_from).vocab_size, recipe.model.init_from
    spec = recipe.data.tokenizer
    if sample_tokenizer_size(spec) is not None or Path(spec).expanduser().is_dir():
        return len(load_tokenizer(spec)), spec
    try:
        from transformers import AutoTokenizer  # heavy (about a second): only for a hub tokenizer

        return len(AutoTokenizer.from_pretrained(spec, local_files_only=True)), spec
    except Exception:  # noqa: BLE001 - not cached (or not a tokenizer): assume, and say so
        return ASSUMED_VOCAB, f"assumed: {spec} is not in the local cache; set it with --vocab-size N"

