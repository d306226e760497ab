"""Evaluating checkpoints and exported models, and exporting a checkpoint as a plain Hugging Face model."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from . import config as cfgmod
from .data import DataError, build_data, is_local, load_tokenizer
from .files import apply_umask, publish
from .loss import use_chunked_loss
from .models import build_model, held_out_loss, materialize
from .pretrained import meta_model, read_config
from .recipe import load_recipe
from .relora import ReLoRALinear, add_adapters

EXPORT_RECIPE = "qrelora.toml"  # the recipe travels with an export so `qrelora eval` knows its data


def _recipe_from(path: Path, data: str | None) -> cfgmod.Recipe:
    overrides = ["--checkpoint.resume=never", "--quant.master=memory"]
    if data is not None:
        _check_data_option(data)
        overrides.append(f"--data.dataset={data}")
    return load_recipe(path, overrides)


def _check_data_option(data: str) -> None:
    """A bad --data is the user's to fix, not the checkpoint's recipe (which the recipe check would blame)."""
    if not data.strip() or (is_local(data) and not Path(data).expanduser().exists()):
        raise DataError(f"--data {data!r}: no such file or directory. Give an existing .txt/.jsonl/.json/.parquet "
                        "file or a directory of them, a Hugging Face hub dataset name, or \"sample\".")


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws progress bars on stderr while it writes or loads even a small model ("Writing model
    shards", "Loading weights"); these commands report their result in one line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_checkpoint_model(path: Path, data: str | None = None):
    """(recipe, model with adapters as trained, tokenizer) from a checkpoint directory, on the CPU."""
    path = Path(path)
    if not checkpoint.is_complete(path, checkpoint.MODEL_FILES):
        raise checkpoint.CheckpointError(f"{path} is not a complete checkpoint (expected {', '.join(checkpoint.FILES)})."
                                         " Give a runs/<name>/checkpoints/step_<N> directory.")
    recipe = _recipe_from(path / "config.toml", data)
    saved = checkpoint.load_model_state(path)
    model_state, trainer_state = saved.model, saved.trainer
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    # Laid out on the meta device and given storage one module at a time (every tensor is then overwritten by
    # the checkpoint's): an init_from model's weights are not read again, only its config.json.
    if recipe.model.init_from:
        model = meta_model(recipe.model.init_from)
    else:
        model = build_model(recipe.model, len(tokenizer), recipe.data.seq_len, eos_id=tokenizer.eos_token_id,
                            device="meta")
    if trainer_state["relora_active"]:
        add_adapters(model, recipe.relora, recipe.quant, training_dtype=recipe.training.dtype,
                     seed=recipe.training.seed, device="cpu")
    materialize(model, "cpu")
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not match the model its config.toml describes "
                                         f"(e.g. {(missing + unexpected)[:3]}).")
    return recipe, model, tokenizer


@torch.no_grad()
def merged_linear(layer: ReLoRALinear, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear holding the layer's best full-precision base plus its adapter's update."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
    linear.weight.copy_(layer.effective_weight())
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear


def export(checkpoint_path: Path, out_dir: Path, dtype: str = "bf16") -> Path:
    """Write the merged model (safetensors, config, tokenizer) that AutoModelForCausalLM loads."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise checkpoint.CheckpointError(f"export directory {out_dir} exists and is not empty; choose a new one.")
    recipe, model, tokenizer = load_checkpoint_model(Path(checkpoint_path))
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    names = [name for name, m in model.named_modules() if isinstance(m, ReLoRALinear)]
    for name in names:
        parent, child = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, child, merged_linear(getattr(owner, child), torch_dtype))
    model.to(torch_dtype)
    if recipe.model.init_from:  # the trainer switches the KV cache off; the model's own config goes out
        model.config.use_cache = read_config(recipe.model.init_from).get("use_cache", True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _no_progress_bars():
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_RECIPE).write_text(cfgmod.to_toml(recipe), encoding="utf-8")
    apply_umask(tmp)
    publish(tmp, out_dir)  # out_dir is absent or empty (checked above)
    return out_dir


@torch.no_grad()
def evaluate(path: Path, data: str | None = None, device: str = "auto") -> dict:
    """Held-out loss and perplexity of a checkpoint or an exported model directory."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        recipe, model, tokenizer = load_checkpoint_model(path, data)
        autocast = recipe.training.dtype == "bf16"
    elif (path / "config.json").is_file() and (path / EXPORT_RECIPE).is_file():
        from transformers import AutoModelForCausalLM

        recipe = _recipe_from(path / EXPORT_RECIPE, data)
        tokenizer = load_tokenizer(str(path))
        with _no_progress_bars():
            model = use_chunked_loss(AutoModelForCausalLM.from_pretrained(str(path)))
        autocast = False  # computes in the dtype it was exported in
    else:
        raise checkpoint.CheckpointError(f"{path} is neither a checkpoint (trainer.json, model.safetensors, ...) nor "
                                         f"a model exported by `qrelora export` (config.json and {EXPORT_RECIPE}).")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev)
    try:
        held_out = build_data(recipe.data, tokenizer, recipe.training.seed, eval_only=True)
    except DataError as e:
        if data is None:
            raise
        raise DataError(str(e).replace(f"data.dataset = {data!r}", f"--data {data!r}")) from None  # what was typed
    batches = held_out.eval_batches(recipe.training.micro_batch_size)
    loss = held_out_loss(model, batches, dev, bf16=autocast)
    return {"path": str(path), "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)),
            "eval_tokens": sum(b.numel() for b in batches), "dataset": recipe.data.dataset}


def format_eval(result: dict) -> str:
    return (f"{result['path']}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f} "
            f"on {result['eval_tokens']:,} held-out tokens of {result['dataset']}")
