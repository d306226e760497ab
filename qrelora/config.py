"""Recipes: one dataclass per TOML section, reading a TOML file and command-line overrides into them, and
writing the resolved recipe back out.

Precedence is command line > recipe file > dataclass defaults. Every problem of type and spelling is
collected, not raised, so that qrelora.recipe can report them at once with the checks of values (file,
section, key): a user fixes a recipe in one edit instead of ten runs. This module imports nothing of the
package but its errors, so every module may name its section's type.
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

from .errors import BadInput

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
    preset: Literal["tiny", "bench", "60m", "130m", "250m", "350m", "1b3", "7b", "custom"] = "tiny"
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
    """Hub tokenizer name, a local tokenizer directory, "sample" (a BPE of 8,192 entries trained on the sample
    corpus) or "sample-N" (N entries, e.g. "sample-2048"), or "init_from" (model.init_from's own)."""
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
    embedding_lr_ratio: float = 1.0
    """Learning rate of the token embeddings, the LM head and the norms, the parameters no method makes low-rank,
    as a multiple of the schedule of lr, in every phase and for every method (the attention and MLP matrices
    train at 1x, their adapters at relora.lr_ratio)."""
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
    """The adapters train at lr_ratio times the schedule of training.lr (the paper uses 1.5-2x the full-rank rate
    for the low-rank phase). The cosine envelope is the same one, and the rate never jumps at the switch from
    the warm start: the adapters re-warm from zero over restart_warmup steps like at every restart. The
    parameters that train in full keep their own rate (training.embedding_lr_ratio)."""
    jagged: Literal["adapters", "all"] = "adapters"
    """Which parameters' learning rate restarts (drops to zero before each merge, re-warms after it): only
    the adapters', while embeddings, norms and head, which are never merged or reset, stay on the smooth
    cosine ("adapters"); or every parameter's, as in the paper's reference code ("all")."""
    warm_start_steps: int = 0
    """Full-rank steps before switching to ReLoRA, or a fraction of training.steps (e.g. 0.33: rounded so the
    ReLoRA phase is a whole number of cycles)."""
    reset: str = "magnitude"
    """How the adapters' Adam moments are pruned at each restart: "magnitude", "random", "zero" or "none" (the
    resets of qrelora.optim.RESETS)."""
    reset_ratio: float = 0.99
    """Share of moment entries zeroed by "magnitude" and "random"."""
    init: Literal["zero", "residual"] = "zero"
    """How each adapter starts, at the switch and after every merge: "zero" (A random, B zero: the layer starts
    as its stored weight), or "residual" (the stored codes and s*B@A chosen together so that they sum to the
    full-precision weight as nearly as rank r allows, LoftQ-style: the quantization error is paid back from the
    first step). "residual" needs quant.merge = "exact" or "error_feedback", which keep that weight."""
    init_iterations: int = 1
    """"residual": alternations of quantizing the weight minus the low-rank part and fitting the low-rank part
    (a randomized SVD) to what quantizing lost."""
    activation_checkpointing: bool = True
    """With training.activation_checkpointing on: keep it in the ReLoRA phase (true), or turn it off at the
    switch (false). The frozen weights have no gradients or optimizer states, so the ReLoRA phase often fits
    without recomputing activations, and skips the recomputed forward pass (`qrelora memory --fit` says)."""


@dataclass
class QuantConfig:
    bits: int = 4
    """Storage of the frozen base weights: 4 (NF4/FP4), 8 (blockwise int8) or 16 (qrelora.quant.STORAGE_FORMATS)."""
    type: str = "nf4"
    """4-bit code: "nf4" or "fp4"."""
    blocksize: int = 0
    """Values per quantization block; 0 picks the storage's default (64 for 4-bit, 256 for 8-bit)."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (saves ~0.05 byte per parameter)."""
    merge: str = "exact"
    """How adapter updates are folded into the quantized base at each restart: "exact", "error_feedback",
    "stochastic" or "naive" (qrelora.quant.MERGE_MODES)."""
    master: Literal["memory", "mmap"] = "memory"
    """Where the exact-merge master copy lives: host memory, or a memory-mapped file in the run directory."""


@dataclass
class OptimConfig:
    name: str = "auto"
    """"auto" (paged 8-bit AdamW on CUDA, torch AdamW on CPU), "adamw", "adamw8bit" or "paged_adamw8bit"
    (qrelora.optim.OPTIMIZERS)."""
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
    """"section.key" -> the fraction of training.steps a step count was given as (resolved by parse_recipe);
    not a TOML section."""
    origins: dict[str, str] = field(default_factory=dict, compare=False)
    """"section.key" -> where its value was set (the recipe file or "command line"), for messages; not a TOML
    section."""

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
                             if f.name not in ("source", "fractions", "origins")}

# Step counts that may also be given as a fraction of training.steps (a float in (0, 1)), so that a recipe
# can be shortened with --training.steps alone. load_recipe resolves them to whole steps: everything after
# it (trainer, checkpoints, the run's config.toml) sees integers, the same ones for the same recipe.
FRACTION_KEYS = ("training.warmup_steps", "relora.restart_every", "relora.warm_start_steps")

# Choices whose valid values are the tables of their implementations (storage formats, merge modes, moment
# resets, optimizers): adding one there makes it a valid recipe value. They are taken as given here and
# checked against those tables by qrelora.recipe, so that this schema imports none of them.
TABLE_CHOICES = ("quant.bits", "quant.type", "quant.merge", "relora.reset", "optim.name")


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
            recipe.origins[f"{section}.{key}"] = where
            if f"{section}.{key}" in TABLE_CHOICES:
                setattr(obj, key, value)  # checked against its table by qrelora.recipe
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


def parse_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, list[str]]:
    """Read a TOML recipe and apply overrides: (the recipe, every problem of type and spelling found). Raises
    RecipeError only when there is no recipe to read. qrelora.recipe.load_recipe adds the checks of values."""
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
    return recipe, problems


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
