"""Step checkpoints that survive crashes, load nothing but data, and finding the one to resume from.

A checkpoint is a directory `checkpoints/step_<8 digits>/`:
    model.safetensors      every tensor of the model's state_dict: adapters, full-rank trainables, the packed
                           quantized base with its statistics, and the exact master or rounding residual
    optimizer.safetensors  the optimizer's state_dict (8-bit states included): its tensors, and its
                           structure and plain values as JSON in the file's metadata
    rng.safetensors        torch CPU (and CUDA) generator states, the same way
    trainer.json           step, tokens, merges, ReLoRA phase, data position, metrics offset, step plan
    relora.safetensors     in the ReLoRA phase: the rank-probe layers' weights at the switch (optional: the
                           merges of a run resumed without it report no effective rank)
    config.toml            the resolved recipe
No file is a Python pickle, so loading a checkpoint someone else wrote cannot run code. It is written under
a temporary name, each file flushed to disk, then renamed into place: a crash or a kill at any moment
leaves the previous checkpoints complete, and a half-written one is never picked up.

Checkpoints of qrelora 0.1 kept the optimizer and RNG states in `optimizer.pt` / `rng.pt` (pickles); they
are still found, but their states are read only with `checkpoint.allow_pickle = true`, and then only
through torch's allow-listed unpickler (`weights_only=True`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode

from . import config as cfgmod
from .errors import BadInput
from .files import apply_umask, fsync_dir, fsync_file, publish
from .optim import group_settings
from .quant import LayoutCodec
from .relora import ReLoRALinear, codec_for, rank_probe_indices, rank_probe_layers, target_linears

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json", "rng.safetensors", "config.toml")
LEGACY_FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "rng.pt", "config.toml")
MODEL_FILES = ("model.safetensors", "trainer.json", "config.toml")  # what eval and export read


class CheckpointError(BadInput):
    """A checkpoint that cannot be used for this recipe; the message says why and what to do."""


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(checkpoints_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
         trainer_state: dict[str, Any], recipe: cfgmod.Recipe, keep_last: int, relora_state: dict | None = None) -> Path:
    """Write a checkpoint atomically and prune older ones beyond keep_last."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
    tmp = checkpoints_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = unique_tensors(model_state)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
              metadata={"qrelora_aliases": json.dumps(aliases)})
    fsync_file(tmp / "model.safetensors")
    save_tree(tmp / "optimizer.safetensors", optimizer_state)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_tree(tmp / "rng.safetensors", rng)
    if relora_state is not None:
        save_tree(tmp / "relora.safetensors", relora_state)
    _write(tmp / "trainer.json", json.dumps(trainer_state, indent=1).encode())
    _write(tmp / "config.toml", cfgmod.to_toml(recipe).encode())
    apply_umask(tmp)
    fsync_dir(tmp)
    publish(tmp, final, durable=True)  # replaces the same step saved again (interrupted right after a save)
    for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the state with every tensor once, {second name: first name}). A model with tied embeddings holds its
    LM head and its token embeddings as one parameter under two names; safetensors refuses to store one
    storage twice, and storing it twice would also untie it on load."""
    first: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        # The storage object itself, not its data pointer: tensors of the memory estimate have no data.
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
            unique[name] = t
    return unique, aliases


def is_complete(path: Path, files: tuple[str, ...] = FILES) -> bool:
    """Every file of a checkpoint is there (of either layout, unless `files` says which)."""
    layouts = (files,) if files is not FILES else (FILES, LEGACY_FILES)
    return any(all((path / f).is_file() for f in layout) for layout in layouts)


def is_legacy(path: Path) -> bool:
    return not (path / "optimizer.safetensors").is_file() and is_complete(path, LEGACY_FILES)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints with every file present, oldest first (temporary directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(spec: str, checkpoints_dir: Path) -> Path | None:
    """The checkpoint to resume from: "never" -> None, "auto" -> newest complete one (or None), else a path
    to a checkpoint directory (or to a run directory, whose newest checkpoint is used)."""
    if spec == "never":
        return None
    if spec == "auto":
        found = complete_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(spec)
    if is_complete(path):
        return path
    found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"checkpoint.resume = {spec!r}: no complete checkpoint there (a checkpoint directory "
                              f"holds {', '.join(FILES)}). Point it at checkpoints/step_<N> of a run, or use "
                              '"auto" or "never".')
    return found[-1]


# What must match between a checkpoint and the recipe resuming it: everything that shapes tensors or
# the meaning of the step counter.
MUST_MATCH = {
    "model": ("preset", "hidden_size", "num_layers", "num_heads", "mlp_size"),
    "data": ("tokenizer", "seq_len"),
    "training": ("micro_batch_size", "grad_accum", "warmup_steps"),  # steps: see read_progress
    "relora": ("enabled", "rank", "warm_start_steps", "restart_every"),
    "quant": ("bits", "type", "blocksize", "double_quant", "merge"),
    "optim": ("name",),
}


def check_compatible(path: Path, recipe: cfgmod.Recipe) -> None:
    saved = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    now = cfgmod.to_dict(recipe)
    diffs = [f"[{section}] {key}: checkpoint has {saved.get(section, {}).get(key)!r}, recipe has "
             f"{now[section][key]!r}"
             for section, keys in MUST_MATCH.items() for key in keys
             if saved.get(section, {}).get(key) != _tomlish(now[section][key])]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different recipe and cannot be resumed by this "
                              "one:\n" + "\n".join(f"  - {d}" for d in diffs) +
                              "\nUse the original recipe, another run directory (--run.output_dir=...), or "
                              "--checkpoint.resume=never to start afresh.")


def _tomlish(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class SavedState:
    """What a checkpoint holds, as read back."""

    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    optimizer: dict | None = None
    rng: dict | None = None
    relora: dict | None = None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Delete it to resume from "
                           "the previous one, or use --checkpoint.resume=never.")


def load_model_state(path: Path) -> SavedState:
    """The model tensors and trainer state of a checkpoint (all that eval and export need)."""
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("qrelora_aliases", "{}"))
        model = load_file(str(path / "model.safetensors"))
        model |= {alias: model[name] for alias, name in aliases.items()}
        return SavedState(model=model, trainer=_read_json(path / "trainer.json"))
    except Exception as e:  # noqa: BLE001 - a damaged file of any kind
        raise _unreadable(path, e) from None


def load_files(path: Path, allow_pickle: bool = False) -> SavedState:
    """Everything a checkpoint holds, for resuming. A checkpoint of the old layout (pickled optimizer.pt and
    rng.pt) is refused unless allow_pickle, and even then read only through torch's allow-listed unpickler."""
    check_loadable(path, allow_pickle)
    saved = load_model_state(path)
    legacy = is_legacy(path)
    try:
        if legacy:  # only torch's allow-listed unpickler: tensors and plain values, nothing callable
            saved.optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            saved.rng = torch.load(path / "rng.pt", weights_only=True)
        else:
            saved.optimizer = load_tree(path / "optimizer.safetensors")
            saved.rng = load_tree(path / "rng.safetensors")
            if (path / "relora.safetensors").is_file():
                saved.relora = load_tree(path / "relora.safetensors")
    except Exception as e:  # noqa: BLE001 - a damaged file, or a pickle holding more than plain data
        if legacy:
            raise CheckpointError(
                f"checkpoint {path}: its optimizer.pt / rng.pt hold something other than tensors and plain values "
                f"(torch's allow-listed unpickler refused them: {type(e).__name__}), so they were not loaded and "
                "nothing in them ran. Do not use this checkpoint; start afresh with --checkpoint.resume=never.") from None
        raise _unreadable(path, e) from None
    return saved


def restore(saved: SavedState, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's model, optimizer and RNG states into a run built by the recipe that resumes it."""
    missing, unexpected = model.load_state_dict(saved.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors, e.g. {(missing + unexpected)[:3]}). Use the recipe that wrote it, or --checkpoint.resume=never.")
    settings = group_settings(optimizer)
    try:
        optimizer.load_state_dict(saved.optimizer)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
    except ValueError as e:  # torch's word for parameter groups that differ in number or size
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state that does not fit this run's optimizer ({e}). It was written "
            "with another optimizer setting or by an earlier version of qrelora (which kept the adapters in one "
            "parameter group with the embeddings). Resume it with the version and recipe that wrote it, or start "
            "afresh with --checkpoint.resume=never.") from e
    restore_rng(saved.rng)


def check_loadable(path: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint of the old, pickled layout unless the user opted in."""
    if is_legacy(path) and not allow_pickle:
        raise CheckpointError(
            f"checkpoint {path} stores its optimizer and RNG states as Python pickles (optimizer.pt, rng.pt: the "
            "layout of qrelora 0.1). Loading a pickle can run any code its author put in it, so it is refused. "
            "If you trust whoever wrote this checkpoint, resume with --checkpoint.allow_pickle=true (the states "
            "are then read with torch's allow-listed unpickler, and the next checkpoint is written without "
            "pickles); otherwise start afresh with --checkpoint.resume=never or another --run.output_dir.")


def read_progress(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """(steps done, the run's plan as [(step, total_steps), ...]) of a checkpoint: one entry for a run as
    planned, one more per extension (checkpoints from before extensions existed have one)."""
    try:
        trainer = _read_json(path / "trainer.json")
        plan = trainer.get("plan") or [(0, tomllib.loads((path / "config.toml").read_text())["training"]["steps"])]
        return int(trainer["step"]), [(int(at), int(total)) for at, total in plan]
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from None


# --------------------------------------------------------------------------------------------------
# Nested state (optimizer and RNG state_dicts) as safetensors: tensors in the file, the rest as JSON


def save_tree(path: Path, tree: Any) -> None:
    """A nested structure of dicts, lists, tuples, tensors and plain values as one safetensors file.

    The structure goes into the header's metadata as JSON, tagged so that tuples and non-string dict keys
    (torch optimizers key their state by parameter index) come back as they were.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(obj, dict):
            return {"dict": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"tuple": [encode(v) for v in obj]}
        if isinstance(obj, list):
            return [encode(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors and plain values)")

    structure = encode(tree)
    # safetensors refuses two names for one storage (8-bit optimizers can share a code table): copy those.
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors.values() if t.numel())
    tensors = {k: t.clone() if t.numel() and storages[t.untyped_storage().data_ptr()] > 1 else t
               for k, t in tensors.items()}
    save_file(tensors, path, metadata={"qrelora_tree": json.dumps(structure)})
    fsync_file(path)


def load_tree(path: Path) -> Any:
    """The structure save_tree stored; raises ValueError on anything it would not have written."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if "qrelora_tree" not in metadata:
        raise ValueError(f"{path.name} is not a qrelora state file (no structure in its metadata)")

    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if isinstance(obj, dict):
            (tag, value), = obj.items()
            if tag == "tensor":
                return tensors[value]
            if tag == "tuple":
                return tuple(decode(v) for v in value)
            if tag == "dict":
                return {decode(k): decode(v) for k, v in value}
            raise ValueError(f"unknown tag {tag!r}")
        return obj

    return decode(json.loads(metadata["qrelora_tree"]))


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def estimate_bytes(model: torch.nn.Module, optimizer_state_bytes: Callable[[list[torch.Tensor]], int]) -> int:
    """Size of one checkpoint of this model: its state (the merges' master copy or residual included), the
    rank probes' starting weights in the ReLoRA phase, plus the optimizer's state for its trainable parameters
    (`optimizer_state_bytes`, an OptimizerKind's)."""
    model_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(model.state_dict())[0].values())
    probes = sum(4 * layer.base.numel() for layer in rank_probe_layers(model).values())
    return int(model_bytes + probes + optimizer_state_bytes([p for p in model.parameters() if p.requires_grad]))


def relora_estimate_bytes(model: torch.nn.Module, recipe: cfgmod.Recipe,
                          optimizer_state_bytes: Callable[[list[torch.Tensor]], int]) -> int:
    """One checkpoint's size once the full-rank `model` has switched to ReLoRA: every attention / MLP matrix
    as its ReLoRALinear stores it (codes, scales, master copy or residual, adapters), laid out on fake tensors
    once per shape; the rank probes' starting weights; the other tensors as they are; the optimizer's state (`optimizer_state_bytes`, an
    OptimizerKind's) for what then trains."""
    codec = LayoutCodec(codec_for(recipe.quant, recipe.training.dtype))
    cfg, layers, replaced, trainable = recipe.relora, {}, set(), []
    linears = list(target_linears(model))
    state_bytes = sum(4 * linears[i][1].weight.numel() for i in rank_probe_indices(len(linears)))
    for _, m in linears:
        key = (m.in_features, m.out_features, m.bias is not None)
        if key not in layers:
            with FakeTensorMode():
                layers[key] = ReLoRALinear(torch.nn.Linear(*key), cfg.rank, cfg.alpha, cfg.dropout, codec,
                                           recipe.quant.merge)
        state_bytes += sum(t.numel() * t.element_size() for t in layers[key].state_dict().values())
        trainable += [p for p in layers[key].parameters() if p.requires_grad]
        replaced |= {id(t) for t in m.parameters()}
    state_bytes += sum(t.numel() * t.element_size() for t in unique_tensors(model.state_dict(keep_vars=True))[0].values()
                       if id(t) not in replaced)
    trainable += [p for p in model.parameters() if p.requires_grad and id(p) not in replaced]
    return state_bytes + optimizer_state_bytes(trainable)


def saves_left(done: int, steps: int, every: int) -> int:
    """Checkpoints a run writes from step `done` to `steps`: every `every` steps (0: none) and at the end."""
    return ((steps - 1) // every - done // every if every else 0) + 1


def disk_needed(one_checkpoint: int, keep_last: int, existing: int, saves: int) -> int:
    """Disk the run's checkpoints still need: each save is written whole before the checkpoints beyond
    keep_last are deleted, so up to keep_last + 1 exist at once; those already on disk are paid for."""
    at_most = min(keep_last + 1, existing + saves)
    return max(at_most - existing, 1) * one_checkpoint
