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


class RecipeError(Exception):
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
    """Linear warm-up from zero at the start of the run."""
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
    """Optimizer steps between merges."""
    restart_warmup: int = 50
    """Linear learning-rate re-warm-up after each restart."""
    warm_start_steps: int = 0
    """Full-rank steps before switching to ReLoRA."""
    reset: Literal["magnitude", "random", "zero", "none"] = "magnitude"
    """How the adapters' Adam moments are pruned at each restart."""
    reset_ratio: float = 0.99
    """Share of moment entries zeroed by "magnitude" and "random"."""


@dataclass
class QuantConfig:
    bits: Literal[4, 8, 16] = 4
    """Storage of the frozen base weights: 4-bit (NF4/FP4), 8-bit blockwise, or 16-bit."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit code."""
    blocksize: int = 0
    """Values per quantization block; 0 picks 64 for 4-bit and 256 for 8-bit."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (saves ~0.05 byte per parameter)."""
    merge: Literal["exact", "error_feedback", "stochastic", "naive"] = "exact"
    """How adapter updates are folded into the quantized base at each restart."""
    master: Literal["memory", "mmap"] = "memory"
    """Where the exact-merge master copy lives: host memory, or a memory-mapped file in the run directory."""

    @property
    def effective_blocksize(self) -> int:
        return self.blocksize or (256 if self.bits == 8 else 64)


@dataclass
class OptimConfig:
    name: Literal["auto", "paged_adamw8bit", "adamw8bit", "adamw"] = "auto"
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

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def tokens_per_step(self) -> int:
        t = self.training
        return t.micro_batch_size * t.grad_accum * self.data.seq_len


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe) if f.name != "source"}


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
    problems += validate(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


# --------------------------------------------------------------------------------------------------
# Semantic validation: ranges and combinations


def validate(r: Recipe) -> list[str]:
    """Every range and consistency problem of a type-correct recipe, as messages naming section and key."""
    p: list[str] = []

    def need(cond: bool, section: str, key: str, msg: str) -> None:
        if not cond:
            p.append(f"[{section}] {key} = {getattr(getattr(r, section), key)!r}: {msg}")

    m, d, t, rl, q, o, c = r.model, r.data, r.training, r.relora, r.quant, r.optim, r.checkpoint
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_size"):
        need(getattr(m, key) >= 0, "model", key, "must be >= 0 (0 keeps the preset's value)")
        if m.preset == "custom":
            need(getattr(m, key) > 0, "model", key, 'must be set (> 0) when preset = "custom"')
    if m.hidden_size > 0 and m.num_heads > 0:
        need(m.hidden_size % m.num_heads == 0, "model", "hidden_size", f"must be divisible by num_heads ({m.num_heads})")
    if m.init_from:
        need(Path(m.init_from).is_dir(), "model", "init_from", "is not a directory (a Hugging Face model directory)")

    need(d.seq_len >= 8, "data", "seq_len", "must be >= 8")
    need(d.eval_tokens >= d.seq_len, "data", "eval_tokens", f"must be at least one sequence (seq_len = {d.seq_len})")
    need(bool(d.dataset), "data", "dataset", 'must be "sample", a local path or a hub dataset name')
    need(bool(d.tokenizer), "data", "tokenizer", 'must be "sample", a local directory or a hub tokenizer name')
    for key in ("dataset", "tokenizer"):
        value = getattr(d, key)
        if _looks_like_path(value):
            need(Path(value).exists(), "data", key, "path does not exist")

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
             f"must be in [0, training.steps) (steps = {t.steps}); the ReLoRA phase needs at least one step")
        need(rl.restart_every >= 1, "relora", "restart_every", "must be >= 1")
        need(0 <= rl.restart_warmup < max(rl.restart_every, 1), "relora", "restart_warmup",
             f"must be shorter than a cycle (restart_every = {rl.restart_every})")
        relora_steps = t.steps - rl.warm_start_steps
        if rl.restart_every >= 1 and relora_steps > 0 and relora_steps % rl.restart_every:
            need(False, "relora", "restart_every",
                 f"must divide the ReLoRA phase (training.steps - relora.warm_start_steps = {relora_steps}) so "
                 "every cycle is whole")
        if rl.warm_start_steps == 0:
            need(t.warmup_steps < rl.restart_every, "training", "warmup_steps",
                 f"must be shorter than the first cycle (relora.restart_every = {rl.restart_every})")
        need(0 <= rl.reset_ratio <= 1, "relora", "reset_ratio", "must be in [0, 1]")
    if q.bits == 4 and q.blocksize:
        need(q.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096), "quant", "blocksize",
             "must be a power of two in 32..4096 for 4-bit storage")
    elif q.bits == 8 and q.blocksize:
        need(q.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quant", "blocksize",
             "must be a power of two in 64..4096 for 8-bit storage")

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
    return p


def _looks_like_path(spec: str) -> bool:
    """Local paths start with ./ ../ / ~ or end in a data-file suffix; hub names are 'owner/name'."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith((".txt", ".jsonl", ".json", ".parquet"))


# --------------------------------------------------------------------------------------------------
# Writing the resolved recipe


def to_toml(r: Recipe) -> str:
    """The resolved recipe as TOML (written to every run directory and checkpoint)."""
    out = [f"# resolved recipe (source: {r.source})"]
    for section in SECTIONS:
        out.append(f"\n[{section}]")
        for f in dataclasses.fields(getattr(r, section)):
            out.append(f"{f.name} = {_toml_value(getattr(getattr(r, section), f.name))}")
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
