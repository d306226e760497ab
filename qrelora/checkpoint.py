"""Step checkpoints that survive crashes, and finding the one to resume from.

A checkpoint is a directory `checkpoints/step_<8 digits>/`:
    model.safetensors   every tensor of the model's state_dict: adapters, full-rank trainables, the packed
                        quantized base with its statistics, and the exact master or rounding residual
    optimizer.pt        the optimizer's state_dict (8-bit states included)
    trainer.json        step, tokens, merges, ReLoRA phase, data position, metrics offset
    rng.pt              torch CPU (and CUDA) generator states
    config.toml         the resolved recipe
It is written under a temporary name, each file flushed to disk, then renamed into place: a crash or a
kill at any moment leaves the previous checkpoints complete, and a half-written one is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import torch

from . import config as cfgmod

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "rng.pt", "config.toml")


class CheckpointError(Exception):
    """A checkpoint that cannot be used for this recipe; the message says why and what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save(checkpoints_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
         trainer_state: dict[str, Any], recipe: cfgmod.Recipe, keep_last: int) -> Path:
    """Write a checkpoint atomically and prune older ones beyond keep_last."""
    from safetensors.torch import save

    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step_{step:08d}"
    tmp = checkpoints_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    _write(tmp / "model.safetensors", lambda f: f.write(save(tensors)))
    _write(tmp / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _write(tmp / "rng.pt", lambda f: torch.save(rng, f))
    _write(tmp / "trainer.json", lambda f: f.write(json.dumps(trainer_state, indent=1).encode()))
    _write(tmp / "config.toml", lambda f: f.write(cfgmod.to_toml(recipe).encode()))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints with every file present, oldest first (temporary directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()
             and all((p / f).is_file() for f in FILES)]
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
    if all((path / f).is_file() for f in FILES):
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
    "training": ("micro_batch_size", "grad_accum", "steps", "warmup_steps"),
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


def load_files(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(model state, optimizer state, trainer state, rng state) of a checkpoint directory."""
    from safetensors.torch import load_file

    try:
        model_state = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=False)
        trainer_state = json.loads((path / "trainer.json").read_text())
    except Exception as e:  # noqa: BLE001 - a damaged file of any kind
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Delete it to resume "
                              "from the previous one, or use --checkpoint.resume=never.") from None
    return model_state, optimizer_state, trainer_state, rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def estimate_bytes(model: torch.nn.Module, optimizer_state_bytes_per_param: float = 8.0) -> int:
    """Rough size of one checkpoint: the model state plus Adam's two fp32 moments per trainable value."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(model_bytes + optimizer_state_bytes_per_param * trainable)
