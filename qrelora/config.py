"""Recipes: one dataclass per TOML section, loading, command-line overrides and validation.

Precedence is command line > recipe file > dataclass defaults. Every problem in a recipe is collected
and reported at once (file, section, key), so a user fixes a recipe in one edit instead of ten runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .data import is_local
from .errors import BadInput
from .models import model_dims
from .optim import OPTIMIZERS, RESETS
from .quant import MERGE_MODES, STORAGE_FORMATS, storage_class
from .schedule import JaggedCosine

# Choices that come from the tables of their implementations: adding a storage format, merge mode, reset
# mode or optimizer there makes it a valid recipe value here.
STORAGE_BITS = Literal[tuple(sorted({bits for bits, _ in STORAGE_FORMATS}))]
STORAGE_TYPES = Literal[tuple(sorted({t for _, t in STORAGE_FORMATS if t is not None}))]
MERGE_CHOICES = Literal[tuple(MERGE_MODES)]
RESET_CHOICES = Literal[tuple(RESETS)]
OPTIMIZER_CHOICES = Literal[("auto", *OPTIMIZERS)]


class RecipeError(BadInput):
    """A recipe or override that cannot be used; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe; fix them and run again:\n{lines}")


@dataclass
class RunConfig:
    name: str = ""
    """Run name; defaults to the recipe file's stem."""
    output_dir: str = ""
    """Run directory; defaults to runs/<name>."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run dir>/tensorboard (needs the tensorboard package)."""


@dataclass
class ModelConfig:
    preset: Literal["tiny", "60m", "130m", "250m", "350m", "1b3", "7b", "custom"] = "tiny"
    """A shape from the ReLoRA paper, or "custom" with the four sizes below."""
    hidden_size: int = 0
    """Overrides the preset's hidden size when > 0."""
    num_layers: int = 0
    """Overrides the preset's number of decoder blocks when > 0."""
    num_heads: int = 0
    """Overrides the preset's number of attention heads when > 0."""
    mlp_size: int = 0
    """Overrides the preset's MLP (intermediate) size when > 0."""
    init_from: str = ""
    """A Hugging Face model directory to start from instead of random init (optional)."""


@dataclass
class DataConfig:
    dataset: str = "sample"
    """Hub dataset name (streamed), a local file or directory (txt, jsonl, parquet), or "sample"."""
    dataset_config: str = ""
    """Hub dataset configuration name, e.g. "en" for allenai/c4."""
    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hub data."""
    tokenizer: str = "sample"
    """Hub tokenizer name, a local tokenizer directory, or "sample" (a BPE trained on the sample corpus)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    eval_tokens: int = 65536
    """Held-out tokens used for each evaluation."""


@dataclass
class TrainingConfig:
    steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine envelope ends at min_lr_ratio * lr."""
    warmup_steps: int = 100
    """Linear warm-up from zero at the start of the run: steps, or a fraction of steps (e.g. 0.05)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seeds model init, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" picks CUDA when present."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Autocast compute dtype; trainable weights stay fp32."""
    activation_checkpointing: bool = True
    """Recompute each block's activations in backward (non-reentrant)."""
    log_every: int = 10
    """Steps between log lines."""
    eval_every: int = 200
    """Steps between evaluations (and one at the start and the end); 0 evaluates only at start and end."""
    max_bad_steps: int = 10
    """Non-finite steps in a row (each one skipped) after which the run stops."""


@dataclass
class ReLoRAConfig:
    enabled: bool = False
    """Train low-rank adapters on frozen (optionally quantized) weights, merged at every restart."""
    rank: int = 128
    """Adapter rank r."""
    alpha: float = 32.0
    """Adapter scale is alpha / rank."""
    dropout: float = 0.1
    """Dropout on the adapter input only."""
    restart_every: int = 1000
    """Optimizer steps between merges, or a fraction of training.steps (e.g. 0.1)."""
    restart_warmup: int = 50
    """Linear learning-rate re-warm-up after each restart, from the zero-rate step before the merge; 0: no jag
    (no zero step, no ramp)."""
    lr_ratio: float = 1.0
    """The ReLoRA phase runs at lr_ratio times the schedule of training.lr (the paper uses 1.5-2x the
    full-rank rate for the low-rank phase). The cosine envelope is the same one, and the rate never jumps at
    the switch from the warm start: the adapters re-warm from zero over restart_warmup steps like at every
    restart, the parameters that train in full ease from 1x to lr_ratio x over the same steps."""
    jagged: Literal["adapters", "all"] = "adapters"
    """Which parameters' learning rate restarts (drops to zero before each merge, re-warms after it): only
    the adapters', while embeddings, norms and head, which are never merged or reset, stay on the smooth
    cosine ("adapters"); or every parameter's, as in the paper's reference code ("all")."""
    warm_start_steps: int = 0
    """Full-rank steps before switching to ReLoRA, or a fraction of training.steps (e.g. 0.33: rounded so the
    ReLoRA phase is a whole number of cycles)."""
    reset: RESET_CHOICES = "magnitude"
    """How the adapters' Adam moments are pruned at each restart."""
    reset_ratio: float = 0.99
    """Share of moment entries zeroed by "magnitude" and "random"."""
    activation_checkpointing: bool = True
    """With training.activation_checkpointing on: keep it in the ReLoRA phase (true), or turn it off at the
    switch (false). The frozen weights have no gradients or optimizer states, so the ReLoRA phase often fits
    without recomputing activations, and skips the recomputed forward pass (`qrelora memory --fit` says)."""


@dataclass
class QuantConfig:
    bits: STORAGE_BITS = 4
    """Storage of the frozen base weights: 4-bit (NF4/FP4), 8-bit blockwise, or 16-bit."""
    type: STORAGE_TYPES = "nf4"
    """4-bit code."""
    blocksize: int = 0
    """Values per quantization block; 0 picks the storage's default (64 for 4-bit, 256 for 8-bit)."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (saves ~0.05 byte per parameter)."""
    merge: MERGE_CHOICES = "exact"
    """How adapter updates are folded into the quantized base at each restart."""
    master: Literal["memory", "mmap"] = "memory"
    """Where the exact-merge master copy lives: host memory, or a memory-mapped file in the run directory."""


@dataclass
class OptimConfig:
    name: OPTIMIZER_CHOICES = "auto"
    """"auto": paged 8-bit AdamW on CUDA, torch AdamW on CPU."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to norms)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints; 0 saves only at the end and on interruption."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: str = "auto"
    """"auto" (newest valid checkpoint of the run directory), "never", or a checkpoint path."""
    allow_pickle: bool = False
    """Resume from a checkpoint of the old layout (pickled optimizer.pt / rng.pt): only one you trust."""


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: str = field(default="<defaults>", compare=False)
    """Where the recipe came from (for messages); not a TOML section."""
    fractions: dict[str, float] = field(default_factory=dict, compare=False)
    """"section.key" -> the fraction of training.steps a step count was given as (resolved by load_recipe);
    not a TOML section."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def tokens_per_step(self) -> int:
        t = self.training
        return t.micro_batch_size * t.grad_accum * self.data.seq_len

    def checkpointing(self, relora_phase: bool) -> bool:
        """Whether activation checkpointing is on in the full-rank (warm start) or the ReLoRA phase."""
        return self.training.activation_checkpointing and (self.relora.activation_checkpointing or not relora_phase)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe)
                             if f.name not in ("source", "fractions")}

# Step counts that may also be given as a fraction of training.steps (a float in (0, 1)), so that a recipe
# can be shortened with --training.steps alone. load_recipe resolves them to whole steps: everything after
# it (trainer, checkpoints, the run's config.toml) sees integers, the same ones for the same recipe.
FRACTION_KEYS = ("training.warmup_steps", "relora.restart_every", "relora.warm_start_steps")


# --------------------------------------------------------------------------------------------------
# Type checking of raw TOML values against the dataclass annotations


def _coerce(value: Any, annotation: Any) -> tuple[Any, str | None]:
    """Return (value converted to the annotated type, None) or (None, what was expected)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and type(value) is type(choices[0]):
            return value, None
        return None, "one of " + ", ".join(repr(c) for c in choices)
    if annotation is bool:
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, "an integer"
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return None, "a finite number"
    if annotation is str:
        return (value, None) if isinstance(value, str) else (None, "a string")
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            out = []
            for v, a in zip(value, args):
                c, err = _coerce(v, a)
                if err:
                    return None, f"a list of {len(args)} numbers"
                out.append(c)
            return tuple(out), None
        return None, f"a list of {len(args)} numbers"
    raise TypeError(f"unsupported annotation {annotation!r}")  # a bug in this module, not user input


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(recipe: Recipe, tree: dict, where: str, problems: list[str]) -> None:
    """Apply a {section: {key: value}} tree onto recipe, collecting problems."""
    for section, keys in tree.items():
        if section not in SECTIONS:
            problems.append(f"{where}: unknown section [{section}]{_did_you_mean(section, list(SECTIONS))}; "
                            f"sections are {', '.join(SECTIONS)}")
            continue
        if not isinstance(keys, dict):
            problems.append(f"{where}: [{section}] must be a table of keys, got {keys!r}")
            continue
        obj = getattr(recipe, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in keys.items():
            if key not in hints:
                problems.append(f"{where}: [{section}] unknown key {key!r}{_did_you_mean(key, list(hints))}; "
                                f"keys are {', '.join(hints)}")
                continue
            if f"{section}.{key}" in FRACTION_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
                if isinstance(value, float) and 0 < value < 1:
                    setattr(obj, key, value)  # resolved to whole steps by _resolve_fractions
                else:
                    problems.append(f"{where}: [{section}] {key} = {value!r} must be a whole number of steps or a "
                                    f"fraction of training.steps between 0 and 1 (e.g. {key} = 0.25)")
                continue
            converted, expected = _coerce(value, hints[key])
            if expected:
                problems.append(f"{where}: [{section}] {key} = {value!r} must be {expected}")
                continue
            setattr(obj, key, converted)


def parse_override(arg: str) -> tuple[str, str, Any]:
    """Parse '--section.key=value' (value in TOML syntax, bare words taken as strings)."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ValueError(f"override {arg!r} must look like --section.key=value, e.g. --training.steps=30")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply overrides, validate; raise RecipeError listing every problem."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        found = sorted(str(f) for f in path.glob("*.toml"))
        listed = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise RecipeError(source, [f"{path} is a directory, not a recipe file; give one of the recipe files in it: "
                                   f"{listed}" if found else f"{path} is a directory with no .toml recipe files in "
                                   "it; give a recipe file (shipped recipes are in recipes/)"])
    if not path.is_file():
        raise RecipeError(source, [f"recipe file not found: {path} (check the path; shipped recipes are in recipes/)"])
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(source, [f"not valid TOML: {e}"]) from None
    recipe = Recipe(source=source)
    problems: list[str] = []
    _apply(recipe, tree, source, problems)
    override_tree: dict[str, dict[str, Any]] = {}
    for arg in overrides:
        try:
            section, key, value = parse_override(arg)
        except ValueError as e:
            problems.append(str(e))
            continue
        override_tree.setdefault(section, {})[key] = value
    _apply(recipe, override_tree, "command line", problems)
    if not recipe.run.name:
        recipe.run.name = path.stem
    if not recipe.run.output_dir:
        recipe.run.output_dir = str(Path("runs") / recipe.run.name)
    _resolve_fractions(recipe)
    problems += validate(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _resolve_fractions(r: Recipe) -> None:
    """Turn the FRACTION_KEYS given as fractions of training.steps into whole steps, in place.

    warmup_steps and restart_every become round(fraction * steps) (restart_every at least 1). A fractional
    warm_start_steps is placed so that the ReLoRA phase after it is a whole number of cycles: the number
    nearest to (1 - fraction) * steps / restart_every, at least one. The result depends on the recipe
    alone, so resuming a run resolves to the integers its checkpoints recorded."""
    steps = max(r.training.steps, 1)
    r.fractions = {}
    for dotted in FRACTION_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(r, section), key)
        if isinstance(value, float):
            r.fractions[dotted] = value
    t, rl, f = r.training, r.relora, r.fractions
    if "training.warmup_steps" in f:
        t.warmup_steps = _round_half_up(f["training.warmup_steps"] * steps)
    if "relora.restart_every" in f:
        rl.restart_every = max(1, _round_half_up(f["relora.restart_every"] * steps))
    if "relora.warm_start_steps" in f:
        fraction = f["relora.warm_start_steps"]
        rl.warm_start_steps = _round_half_up(fraction * steps)
        if isinstance(rl.restart_every, int) and rl.restart_every >= 1:
            cycles = max(1, _round_half_up((1 - fraction) * steps / rl.restart_every))
            if cycles * rl.restart_every <= steps:
                rl.warm_start_steps = steps - cycles * rl.restart_every


# --------------------------------------------------------------------------------------------------
# Semantic validation: ranges and combinations


def validate(r: Recipe) -> list[str]:
    """Every range and consistency problem of a type-correct recipe, as messages naming section and key."""
    p: list[str] = []

    def need(cond: bool, section: str, key: str, msg: str) -> None:
        if not cond:
            p.append(f"[{section}] {key} = {_shown(r, section, key)}: {msg}")

    m, d, t, rl, q, o, c = r.model, r.data, r.training, r.relora, r.quant, r.optim, r.checkpoint
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_size"):
        need(getattr(m, key) >= 0, "model", key, "must be >= 0 (0 keeps the preset's value)")
        if m.preset == "custom":
            need(getattr(m, key) > 0, "model", key, 'must be set (> 0) when preset = "custom"')
    if m.init_from:
        need(Path(m.init_from).is_dir(), "model", "init_from", "is not a directory (a Hugging Face model directory)")

    need(d.seq_len >= 8, "data", "seq_len", "must be >= 8")
    need(d.eval_tokens >= d.seq_len, "data", "eval_tokens", f"must be at least one sequence (seq_len = {d.seq_len})")
    need(bool(d.dataset), "data", "dataset", 'must be "sample", a local path or a hub dataset name')
    need(bool(d.tokenizer), "data", "tokenizer", 'must be "sample", a local directory or a hub tokenizer name')
    for key in ("dataset", "tokenizer"):
        value = getattr(d, key)
        if is_local(value):
            need(Path(value).expanduser().exists(), "data", key, "path does not exist")

    need(t.steps >= 1, "training", "steps", "must be >= 1")
    need(t.micro_batch_size >= 1, "training", "micro_batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "training", "grad_accum", "must be >= 1")
    need(0 < t.lr <= 1, "training", "lr", "must be in (0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "training", "min_lr_ratio", "must be in [0, 1]")
    need(0 <= t.warmup_steps < t.steps, "training", "warmup_steps", f"must be in [0, steps) (steps = {t.steps})")
    need(t.grad_clip >= 0, "training", "grad_clip", "must be >= 0 (0 disables clipping)")
    need(t.log_every >= 1, "training", "log_every", "must be >= 1")
    need(t.eval_every >= 0, "training", "eval_every", "must be >= 0")
    need(t.max_bad_steps >= 1, "training", "max_bad_steps", "must be >= 1")

    if rl.enabled:
        need(rl.rank >= 1, "relora", "rank", "must be >= 1")
        need(rl.alpha > 0, "relora", "alpha", "must be > 0")
        need(0 <= rl.dropout < 1, "relora", "dropout", "must be in [0, 1)")
        need(0 <= rl.warm_start_steps < t.steps, "relora", "warm_start_steps",
             f"must be in [0, training.steps) (steps = {t.steps}); the ReLoRA phase needs at least one step. Set "
             f"it below {t.steps}, or as a fraction of training.steps (e.g. warm_start_steps = 0.33)")
        need(rl.restart_every >= 1, "relora", "restart_every", "must be >= 1")
        need(0 <= rl.restart_warmup < max(rl.restart_every, 1), "relora", "restart_warmup",
             f"must be shorter than a cycle, restart_every = {_shown(r, 'relora', 'restart_every')}; set "
             f"--relora.restart_warmup={max(rl.restart_every, 1) // 10}, or make the cycles longer")
        relora_steps = t.steps - rl.warm_start_steps
        if rl.restart_every >= 1 and relora_steps > 0 and relora_steps % rl.restart_every:
            need(False, "relora", "restart_every", _whole_cycles_fix(r, relora_steps))
        if rl.warm_start_steps == 0:
            need(t.warmup_steps < rl.restart_every, "training", "warmup_steps",
                 f"must be shorter than the first cycle, relora.restart_every = "
                 f"{_shown(r, 'relora', 'restart_every')}, when ReLoRA starts at step 0; set it below "
                 f"{rl.restart_every} (e.g. --training.warmup_steps={rl.restart_every // 2})")
        need(0 <= rl.reset_ratio <= 1, "relora", "reset_ratio", "must be in [0, 1]")
        need(0 < rl.lr_ratio <= 10 and rl.lr_ratio * t.lr <= 1, "relora", "lr_ratio",
             f"must be in (0, 10] with lr_ratio * training.lr <= 1 (training.lr = {t.lr:g}); the paper's range "
             "is 1.5-2")
        if not p:
            p += _idle_cycle_problems(r)
    if (q.bits, q.type) not in STORAGE_FORMATS and (q.bits, None) not in STORAGE_FORMATS:
        types = sorted(t for b, t in STORAGE_FORMATS if b == q.bits and t is not None)
        need(False, "quant", "type", f"is not a {q.bits}-bit storage; {q.bits}-bit types are {', '.join(types)}")
    elif q.blocksize:
        sizes = storage_class(q).blocksizes
        need(q.blocksize in sizes, "quant", "blocksize",
             f"must be one of {', '.join(map(str, sizes))} for {q.bits}-bit storage (0 picks its default)" if sizes
             else f"must be 0: {q.bits}-bit storage has no blocks")

    need(all(0 <= b < 1 for b in o.betas), "optim", "betas", "each must be in [0, 1)")
    need(0 < o.eps < 1, "optim", "eps", "must be in (0, 1)")
    need(o.weight_decay >= 0, "optim", "weight_decay", "must be >= 0")

    if r.run.tensorboard:
        import importlib.util

        need(importlib.util.find_spec("tensorboard") is not None, "run", "tensorboard",
             'needs the tensorboard package (pip install tensorboard, or pip install -e ".[tensorboard]")')
    need(c.every >= 0, "checkpoint", "every", "must be >= 0 (0 saves only at the end)")
    need(c.keep_last >= 1, "checkpoint", "keep_last", "must be >= 1")
    if c.resume not in ("auto", "never"):
        need(Path(c.resume).exists(), "checkpoint", "resume", 'must be "auto", "never" or an existing checkpoint path')
    return p + _shape_problems(r)


def _shape_problems(r: Recipe) -> list[str]:
    """Problems that depend on the model's real dimensions: the preset with the recipe's overrides, or the
    config.json of model.init_from. Found here they cost nothing; found by the trainer they cost the warm
    start (an adapter rank above the layers' size used to end, after it, in an out-of-memory kill)."""
    m, d, rl = r.model, r.data, r.relora
    sizes = ("hidden_size", "num_layers", "num_heads", "mlp_size")
    if any(getattr(m, k) < 0 for k in sizes) or (m.preset == "custom" and not all(getattr(m, k) > 0 for k in sizes)):
        return []  # reported by validate
    if m.init_from and not Path(m.init_from).expanduser().is_dir():
        return []  # reported by validate
    try:
        dims = model_dims(m)
    except ValueError as e:
        return [f"[model] init_from = {m.init_from!r}: {e}"]
    p: list[str] = []
    origin = "init_from's config.json" if m.init_from else _shape_origin(m)

    if m.init_from:
        in_file = {"hidden_size": ("hidden_size", dims.hidden_size),
                   "num_layers": ("num_hidden_layers", dims.num_layers),
                   "num_heads": ("num_attention_heads", dims.num_heads),
                   "mlp_size": ("intermediate_size", dims.mlp_size)}
        for key, (json_key, value) in in_file.items():
            if getattr(m, key) > 0 and getattr(m, key) != value:
                p.append(f"[model] {key} = {getattr(m, key)}: the model comes from init_from = {m.init_from!r}, whose "
                         f"config.json has {json_key} = {value}; remove {key} from the recipe (an init_from model "
                         "keeps its own sizes)")
        if dims.max_positions and d.seq_len > dims.max_positions:
            p.append(f"[data] seq_len = {d.seq_len}: the model in init_from = {m.init_from!r} was built for at most "
                     f"{dims.max_positions} positions (max_position_embeddings in its config.json); set "
                     f"--data.seq_len={dims.max_positions} or lower")
    else:
        h, n = dims.hidden_size, dims.num_heads
        if h % n or (h // n) % 2:
            # Rotary position embeddings rotate pairs of dimensions, so a head needs an even size.
            why = (f"must split hidden_size = {h} into equal attention heads of an even size (rotary position "
                   f"embeddings rotate pairs of dimensions), but with {origin} a head would have {h / n:.4g} "
                   "dimensions")
            if m.num_heads > 0 or m.hidden_size == 0:
                options = [k for k in range(1, h + 1) if h % k == 0 and (h // k) % 2 == 0]
                near = sorted(options, key=lambda k: (abs(k - n), k))[:2]
                p.append(f"[model] num_heads = {n}: {why}. Set num_heads = {' or '.join(map(str, sorted(near)))}")
            else:
                step = 2 * n
                near = sorted({max(step, h // step * step), -(-h // step) * step})
                p.append(f"[model] hidden_size = {h}: {why}. Set hidden_size to a multiple of {step} (2 x num_heads "
                         f"= {n}), e.g. {' or '.join(map(str, near))}")
            return p  # the layer sizes below would be wrong

    if rl.enabled and rl.rank >= 1:
        layers = dims.adapted_layers()
        limit = min(min(io) for io in layers.values())
        if rl.rank > limit:
            groups: dict[tuple[int, int], list[str]] = {}
            for name, io in layers.items():
                groups.setdefault(tuple(sorted(io)), []).append(name.removesuffix("_proj"))
            shapes = ", ".join(f"{'/'.join(names)}_proj {a} x {b}" for (a, b), names in groups.items())
            per_rank = dims.num_layers * sum(i + o for i, o in layers.values())
            p.append(f"[relora] rank = {rl.rank}: must be at most {limit}, the smaller side of the narrowest adapted "
                     f"layers ({shapes}, from {origin}). An update B @ A of a layer cannot have a rank above its "
                     f"smaller side, so a larger rank only adds memory: rank {rl.rank} would train "
                     f"{rl.rank * per_rank / 1e6:,.0f}M adapter parameters. Set --relora.rank={limit} or lower (the "
                     "shipped recipes use 32 to 128)")
    return p


def _idle_cycle_problems(r: Recipe) -> list[str]:
    """A cycle in which the adapters never get a learning rate above zero is merged untrained: the run would
    look healthy (the embeddings still learn) while ReLoRA does nothing."""
    t, rl = r.training, r.relora
    schedule = JaggedCosine(lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
                            restart_every=rl.restart_every, restart_warmup=rl.restart_warmup,
                            relora_start=rl.warm_start_steps, relora_lr_ratio=rl.lr_ratio)
    idle = schedule.idle_cycles()
    if not idle:
        return []
    steps = ", ".join(f"{a + 1}-{b + 1}" if b > a else str(a + 1) for a, b in idle[:3]) + (" ..." if len(idle) > 3 else "")
    cycles = "1 cycle of the ReLoRA phase (steps" if len(idle) == 1 else f"{len(idle)} cycles of the ReLoRA phase (steps"
    return [f"[relora] restart_warmup = {rl.restart_warmup}: with restart_every = {_shown(r, 'relora', 'restart_every')}, "
            f"{cycles} {steps}) {'gives' if len(idle) == 1 else 'give'} the adapters no step at a learning rate above zero (the last step of a cycle runs at zero before its merge, the first ones ramp up from "
            "zero), so their adapters would be merged untrained. Set --relora.restart_warmup=0 (no zero step, no "
            "ramp), or make the cycles longer (relora.restart_every)"]


def _shape_origin(m: ModelConfig) -> str:
    """Where a fresh model's sizes come from, for messages."""
    own = [k for k in ("hidden_size", "num_layers", "num_heads", "mlp_size") if getattr(m, k) > 0]
    if m.preset == "custom":
        return "the recipe's [model] sizes"
    if own:
        return f'the "{m.preset}" preset and {" and ".join(own)} from the recipe'
    return f'the "{m.preset}" preset'


def _shown(r: Recipe, section: str, key: str) -> str:
    """A key's value for a message; a step count resolved from a fraction says so."""
    value = getattr(getattr(r, section), key)
    fraction = r.fractions.get(f"{section}.{key}")
    if fraction is None:
        return repr(value)
    return f"{value!r} ({fraction:g} of training.steps = {r.training.steps})"


def _whole_cycles_fix(r: Recipe, relora_steps: int) -> str:
    """Why restart_every must divide the ReLoRA phase, and the nearest settings that make it whole."""
    t, rl = r.training, r.relora
    every = rl.restart_every
    small = [k for k in range(1, math.isqrt(relora_steps) + 1) if relora_steps % k == 0]
    divisors = sorted(k for k in {*small, *(relora_steps // k for k in small)} if k > rl.restart_warmup)
    below = [k for k in divisors if k < every]
    above = [k for k in divisors if k > every]
    options = " or ".join(str(k) for k in ([below[-1]] if below else []) + ([above[0]] if above else []))
    cycles = relora_steps // every
    totals = sorted({rl.warm_start_steps + k * every for k in (max(cycles, 1), cycles + 1)})
    fix = (f"must divide the ReLoRA phase (training.steps - relora.warm_start_steps = {t.steps} - "
           f"{rl.warm_start_steps} = {relora_steps}) so that every cycle is whole. Set "
           + (f"restart_every = {options}, or " if options else "")
           + f"training.steps = {' or '.join(map(str, totals))}")
    if rl.warm_start_steps and "relora.warm_start_steps" not in r.fractions:
        fix += (f", or give warm_start_steps as a fraction of training.steps (e.g. "
                f"{rl.warm_start_steps / t.steps:.2g}) and it is rounded to whole cycles")
    return fix


# --------------------------------------------------------------------------------------------------
# Writing the resolved recipe


def to_toml(r: Recipe) -> str:
    """The resolved recipe as TOML (written to every run directory and checkpoint)."""
    out = [f"# resolved recipe (source: {r.source})"]
    for section in SECTIONS:
        out.append(f"\n[{section}]")
        for f in dataclasses.fields(getattr(r, section)):
            line = f"{f.name} = {_toml_value(getattr(getattr(r, section), f.name))}"
            if f"{section}.{f.name}" in r.fractions:
                line += f"  # {r.fractions[f'{section}.{f.name}']:g} of training.steps in the recipe"
            out.append(line)
    return "\n".join(out) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_dict(r: Recipe) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(getattr(r, s)) for s in SECTIONS}
