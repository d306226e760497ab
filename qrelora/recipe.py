"""Loading a recipe: parsed into the schema of qrelora.config, then every value checked, all at once, against
what the implementations offer (storage formats, merge modes, moment resets, optimizers: their own tables),
the model's real dimensions (a preset, or an init_from model's config.json) and the learning-rate schedule.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import TABLE_CHOICES, ModelConfig, Recipe, RecipeError, parse_recipe
from .data import is_local, sample_tokenizer_size
from .models import model_dims
from .optim import OPTIMIZERS, RESETS
from .pretrained import PretrainedError, architecture_problem, read_config
from .quant import MERGE_MODES, STORAGE_FORMATS, storage_class
from .schedule import JaggedCosine

CHOICES: dict[str, tuple] = {
    "quant.bits": tuple(sorted({bits for bits, _ in STORAGE_FORMATS})),
    "quant.type": tuple(sorted({t for _, t in STORAGE_FORMATS if t is not None})),
    "quant.merge": tuple(MERGE_MODES),
    "relora.reset": tuple(RESETS),
    "optim.name": ("auto", *OPTIMIZERS),
}
assert set(CHOICES) == set(TABLE_CHOICES)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply overrides, check every value; raise RecipeError listing every problem."""
    recipe, problems = parse_recipe(path, overrides)
    problems += _choice_problems(recipe)
    problems += _resolve_tokenizer(recipe)
    problems += validate(recipe)
    if problems:
        raise RecipeError(recipe.source, problems)
    return recipe


def _resolve_tokenizer(r: Recipe) -> list[str]:
    """data.tokenizer = "init_from" is the tokenizer saved with the model.init_from checkpoint: the directory,
    as the run's config.toml then records it."""
    if r.data.tokenizer != "init_from":
        return []
    if not r.model.init_from:
        return ['[data] tokenizer = "init_from": means the tokenizer of the model.init_from checkpoint, but '
                "model.init_from is not set; set --model.init_from=DIR (a Hugging Face model directory), or name "
                'a tokenizer ("sample", a local directory or a hub name)']
    r.data.tokenizer = r.model.init_from
    return []


def _init_from_problems(r: Recipe) -> list[str]:
    """An init_from directory whose config.json is not a model qrelora trains. Only config.json is read: a
    memory estimate needs nothing else (the weights are checked when training starts, preflight)."""
    m = r.model
    if not m.init_from or not Path(m.init_from).expanduser().is_dir():
        return []  # reported by validate
    try:
        problem = architecture_problem(read_config(m.init_from), m.init_from)
    except PretrainedError as e:
        problem = str(e)
    return [f"[model] init_from = {m.init_from!r}: {problem}"] if problem else []


def _choice_problems(r: Recipe) -> list[str]:
    """The TABLE_CHOICES against their tables. A value that is not there goes back to the default, so the
    checks after this one see a usable recipe."""
    problems = []
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        obj = getattr(r, section)
        value = getattr(obj, key)
        if value in choices and type(value) is type(choices[0]):
            continue
        problems.append(f"{r.origins.get(dotted, r.source)}: [{section}] {key} = {value!r} must be one of "
                        + ", ".join(repr(c) for c in choices))
        setattr(obj, key, getattr(type(obj)(), key))
    return problems


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
    if d.tokenizer.startswith("sample-"):
        need(sample_tokenizer_size(d.tokenizer) is not None, "data", "tokenizer",
             '"sample-N" is the sample corpus\'s BPE with N entries, 256 < N <= 65536 (e.g. "sample-2048")')
    for key in ("dataset", "tokenizer"):
        value = getattr(d, key)
        if is_local(value):
            need(Path(value).expanduser().exists(), "data", key, "path does not exist")

    need(t.steps >= 1, "training", "steps", "must be >= 1")
    need(t.micro_batch_size >= 1, "training", "micro_batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "training", "grad_accum", "must be >= 1")
    need(0 < t.lr <= 1, "training", "lr", "must be in (0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "training", "min_lr_ratio", "must be in [0, 1]")
    need(0 < t.embedding_lr_ratio <= 100 and (t.embedding_lr_ratio * t.lr <= 1 or not 0 < t.lr <= 1), "training",
         "embedding_lr_ratio",
         f"must be in (0, 100] with embedding_lr_ratio * lr <= 1 (lr = {t.lr:g})")
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
        need(rl.init_iterations >= 1, "relora", "init_iterations", "must be >= 1")
        if rl.init == "residual":
            need(q.merge in ("exact", "error_feedback"), "relora", "init",
                 f'"residual" splits the low-rank part off the full-precision weight, which quant.merge = '
                 f'{q.merge!r} does not keep; set --quant.merge=exact (or error_feedback), or --relora.init=zero')
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
    return p + _init_from_problems(r) + _shape_problems(r)


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
