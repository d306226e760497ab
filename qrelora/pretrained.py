"""Hugging Face LLaMA-family checkpoints (`model.init_from`): what is supported, where the weights are, and
reading them one tensor at a time straight into the form a run trains.

transformers' `from_pretrained` reads the whole model into host memory before anything else can happen: a 7B
checkpoint in fp32 needs 28 GB there. Here the model is laid out on the meta device from its config.json, and
each module is given storage and filled from the checkpoint when its turn comes: an adapted linear is quantized
(and its master written) as soon as it is read, so host memory holds one checkpoint tensor at a time next to
what the run keeps. safetensors files are opened per tensor: a tensor read from one is a view of the file's
memory map, and an open file keeps every page it has touched mapped into the process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import BadInput
from .loss import use_chunked_loss

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Tensors some checkpoints carry that the model computes itself.
IGNORED_TENSORS = ("rotary_emb.inv_freq",)
CONVERT_HINT = ("convert it once with transformers (it loads the pickle, so only for a checkpoint you trust): "
                "python -c \"import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
                ".save_pretrained(sys.argv[2])\" IN_DIR OUT_DIR, then copy the tokenizer files")


class PretrainedError(BadInput):
    """A model.init_from checkpoint that cannot be read; the message says why and what to do."""


def read_config(directory: str | Path) -> dict:
    """config.json of a model directory, as JSON (no weights read)."""
    path = Path(directory).expanduser() / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PretrainedError(f"{path} does not exist; init_from must be a Hugging Face model directory (the one "
                              "save_pretrained writes, with config.json and the weights)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path} could not be read as JSON ({e})") from None


def architecture_problem(config: dict, directory: str) -> str | None:
    """Why a config.json is not a model qrelora trains, or None."""
    names = config.get("architectures") or []
    if any(name in SUPPORTED_ARCHITECTURES for name in names):
        return None
    found = ", ".join(names) or f"no architectures entry, model_type {config.get('model_type')!r}"
    return (f"{directory} holds a {found} model; qrelora trains {' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints "
            "(LLaMA-family decoders with q/k/v/o and gate/up/down projections, grouped-query attention, tied "
            "embeddings and rope scaling included). Choose such a model")


@dataclass
class WeightFiles:
    """Where each tensor of a checkpoint lies: tensor name -> file."""

    files: dict[str, Path]
    pickled: bool = False
    _open_pickle: tuple[Path, dict] | None = None

    def read(self, name: str) -> Tensor:
        """One tensor, as stored (its dtype on disk). From a safetensors file it is a view of the file's memory
        map, released with the tensor."""
        path = self.files[name]
        if self.pickled:  # only torch's allow-listed unpickler, memory-mapped; one file's tensors at a time
            if self._open_pickle is None or self._open_pickle[0] != path:
                self._open_pickle = None
                self._open_pickle = (path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            return self._open_pickle[1][name]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))


def weight_files(directory: str | Path, allow_pickle: bool) -> WeightFiles:
    """The checkpoint's weight files (one safetensors file, or shards listed by an index), checked complete.
    Pickled .bin weights only with allow_pickle."""
    directory = Path(directory).expanduser()
    for stem, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        index = directory / f"{stem}.index.json"
        single = directory / stem
        if not (index.is_file() or single.is_file()):
            continue
        if pickled and not allow_pickle:
            raise PretrainedError(
                f"{directory} holds its weights only as Python pickles ({stem}{'.index.json' if index.is_file() else ''}"
                "). Loading a pickle can run code its author put in it, so it is refused. If you trust it, set "
                f"--checkpoint.allow_pickle=true (read with torch's allow-listed unpickler); better, {CONVERT_HINT}.")
        if single.is_file() and not index.is_file():
            return WeightFiles(_names_in(single, pickled), pickled)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise PretrainedError(f"{index} could not be read as a shard index ({type(e).__name__}: {e}); it must "
                                  "hold a \"weight_map\" of tensor name -> file, as save_pretrained writes it") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise PretrainedError(f"{directory} is missing {len(missing)} of the {len(set(weight_map.values()))} "
                                  f"weight shards its {index.name} lists: {shown}. Download them again (a "
                                  "download that stopped half-way leaves this).")
        return WeightFiles({name: directory / f for name, f in weight_map.items()}, pickled)
    raise PretrainedError(f"{directory} has no weights: expected model.safetensors, or shards listed in "
                          "model.safetensors.index.json (what save_pretrained writes)")


def _names_in(path: Path, pickled: bool) -> dict[str, Path]:
    if pickled:
        return {name: path for name in torch.load(path, map_location="cpu", weights_only=True, mmap=True)}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: path for name in f.keys()}


def meta_model(directory: str | Path, config=None) -> nn.Module:
    """The checkpoint's model laid out on the meta device in fp32 (nothing allocated), from its config.json
    (or `config`, a transformers config), with the chunked LM loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(str(Path(directory).expanduser()))
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return use_chunked_loss(model)


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (the LM head of a model with tied
    embeddings): the checkpoint need not hold them, and they are tied again once the original has storage."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or {})


class CheckpointFill:
    """Fills a module that has just been given storage with its tensors from a checkpoint (the `fill` of
    relora.add_adapters and models.materialize), converting to the module's dtype on the module's device."""

    def __init__(self, files: WeightFiles, aliases: set[str]):
        self.files, self.aliases = files, aliases
        self.read_bytes = 0
        self.largest_bytes = 0

    @torch.no_grad()
    def __call__(self, prefix: str, module: nn.Module) -> None:
        for local, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            name = f"{prefix}.{local}" if prefix else local
            if name in self.aliases or any(name.endswith(ignored) for ignored in IGNORED_TENSORS):
                continue
            if name not in self.files.files:
                raise PretrainedError(f"the checkpoint has no tensor {name!r}, which its config.json's model needs; "
                                      "it was written for another architecture or is damaged")
            stored = self.files.read(name)
            if tuple(stored.shape) != tuple(tensor.shape):
                raise PretrainedError(f"tensor {name!r} has shape {tuple(stored.shape)} in the checkpoint but "
                                      f"{tuple(tensor.shape)} in the model its config.json describes; the "
                                      "checkpoint and its config.json do not belong together")
            tensor.copy_(stored)
            size = stored.numel() * stored.element_size()
            self.read_bytes += size
            self.largest_bytes = max(self.largest_bytes, size)
            del stored


def fill_from(directory: str | Path, model: nn.Module, allow_pickle: bool) -> CheckpointFill:
    """The fill that reads model.init_from's tensors into `model` (laid out by meta_model)."""
    return CheckpointFill(weight_files(directory, allow_pickle), tied_aliases(model))


Fill = Callable[[str, nn.Module], None]
