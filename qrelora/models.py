"""LLaMA-style decoders (transformers' LlamaForCausalLM) in the ReLoRA paper's shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .loss import use_chunked_loss


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int


# hidden / layers / heads / MLP from the ReLoRA paper (Lialin et al. 2023, table 9); "tiny" and "bench" are ours,
# sized for CPU runs of a few minutes.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(256, 4, 4, 704),
    # The methods benchmark's model: twice tiny's depth; with a 2,048-entry vocabulary 86% of its parameters sit
    # in the blocks, as in the 1.3B model (about 90%), where tiny's 8,192-entry embeddings and head hold 57%.
    "bench": Shape(256, 8, 4, 704),
    "60m": Shape(512, 8, 8, 1376),
    "130m": Shape(768, 12, 12, 2048),
    "250m": Shape(768, 24, 16, 2560),
    "350m": Shape(1024, 24, 16, 2736),
    "1b3": Shape(2048, 24, 32, 5461),
    "7b": Shape(4096, 32, 32, 11008),
}


def resolve_shape(cfg: ModelConfig) -> Shape:
    base = PRESETS.get(cfg.preset, Shape(0, 0, 0, 0))
    return Shape(
        hidden_size=cfg.hidden_size or base.hidden_size,
        num_layers=cfg.num_layers or base.num_layers,
        num_heads=cfg.num_heads or base.num_heads,
        mlp_size=cfg.mlp_size or base.mlp_size,
    )


@dataclass(frozen=True)
class ModelDims:
    """The sizes a recipe has to respect: of the adapted linears, and what an init_from model was built for."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_size: int
    vocab_size: int | None = None
    """init_from only (a fresh model takes the tokenizer's size)."""
    max_positions: int | None = None
    """init_from only (a fresh model's rotary positions are sized for data.seq_len)."""

    def adapted_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adapted linear of a decoder block (relora.TARGET_MODULES)."""
        h, f = self.hidden_size, self.mlp_size
        attn, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, attn), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (attn, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def model_dims(cfg: ModelConfig) -> ModelDims:
    """The dimensions build_model will give the model: the preset with the recipe's overrides, or the
    config.json of cfg.init_from (read as JSON, without loading any weights). Raises ValueError, naming the
    file, when an init_from directory has no usable config.json."""
    if not cfg.init_from:
        s = resolve_shape(cfg)
        return ModelDims(s.hidden_size, s.num_layers, s.num_heads, s.num_heads, s.hidden_size // max(s.num_heads, 1),
                         s.mlp_size)
    path = Path(cfg.init_from).expanduser() / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; init_from must be a Hugging Face model directory (the one "
                         "save_pretrained writes, with config.json and the weights)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} could not be read as JSON ({e})") from None
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads")
    missing = [k for k in sizes if not (isinstance(c.get(k), int) and c[k] > 0)]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: init_from must be a LLaMA-style decoder (q/k/v/o "
                         "and gate/up/down projections), e.g. one written by qrelora export")
    heads = c["num_attention_heads"]
    return ModelDims(hidden_size=c["hidden_size"], num_layers=c.get("num_hidden_layers") or 0, num_heads=heads,
                     num_kv_heads=c.get("num_key_value_heads") or heads,
                     head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_size=c["intermediate_size"],
                     vocab_size=c.get("vocab_size"), max_positions=c.get("max_position_embeddings"))


def llama_config(cfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None = None, eos_id: int | None = None):
    from transformers import LlamaConfig

    s = resolve_shape(cfg)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.mlp_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=max(seq_len, 2048),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, *, device: str | torch.device = "cpu",
                seed: int = 0, eos_id: int | None = None) -> nn.Module:
    """A fresh fp32 LlamaForCausalLM of the recipe's shape (model.init_from: see pretrained.py). device="meta"
    allocates nothing. Called with labels, it computes the loss a chunk of tokens at a time
    (loss.use_chunked_loss)."""
    from transformers import LlamaForCausalLM

    config = llama_config(cfg, vocab_size, seq_len, eos_id=eos_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return use_chunked_loss(model)


def fp32_model_bytes(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """The model's weights in fp32 (counted on the meta device, nothing allocated)."""
    meta = build_model(cfg, vocab_size=vocab_size, seq_len=seq_len, device="meta")
    return 4 * sum(p.numel() for p in meta.parameters())


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder block: with frozen inputs the reentrant kind silently
    drops the adapters' gradients (measured with torch 2.13 and transformers 5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_activation_checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def disable_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device, bf16: bool) -> float:
    """Mean next-token loss of a causal LM over held-out batches, in eval mode, under bf16 autocast when
    the model trains that way (what the trainer and `qrelora eval` both report)."""
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.float() for b in batches]
    return torch.stack(losses).mean().item()


def init_module(module: nn.Module, std: float) -> None:
    """A fresh LLaMA's initialisation of one module's own tensors (transformers' defaults for this model):
    linears and embeddings normal(0, std) with zero biases, RMSNorm weights one."""
    with torch.no_grad():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)


def fresh_init(model: nn.Module) -> Callable[[str, nn.Module], None]:
    """The fill of a fresh model (see materialize): transformers' initialisation of each module."""
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    return lambda name, module: init_module(module, std)


def materialize(model: nn.Module, device: torch.device | str,
                fill: Callable[[str, nn.Module], None] | None = None) -> None:
    """Give every tensor still on the meta device storage on `device`, one module at a time, and fill it:
    initialised as in a fresh model, or with `fill(module name, module)` (e.g. read from a checkpoint).

    With a model built on the meta device, the ReLoRA conversion materializes and quantizes the big
    linears one at a time (`add_adapters`); this does the rest (embeddings, norms, head, rotary tables), so
    a model never exists in fp32 as a whole: a 7B model is built straight into a 24 GB card. Parameters tied
    to another (the LM head of tied embeddings) are tied again, not given storage of their own."""
    fill = fill or fresh_init(model)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    for name, module in list(model.named_modules()):
        own = [(f"{name}.{n}" if name else n, t) for n, t in
               [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if not any(t.is_meta for _, t in own) or all(n in tied for n, _ in own):
            continue
        if hasattr(module, "inv_freq"):  # rotary tables are computed from the config, not drawn
            parent, child = name.rsplit(".", 1)
            with torch.device(device):
                setattr(model.get_submodule(parent), child, type(module)(config=model.config))
        else:
            module.to_empty(device=device, recurse=False)
            fill(name, module)
    if tied:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after materializing: {left[:3]}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; quantized frozen weights count by their logical size."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        logical = getattr(m, "logical_numel", None)
        if logical is not None:
            total += logical()
    return total, trainable
