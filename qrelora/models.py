"""LLaMA-style decoders (transformers' LlamaForCausalLM) in the ReLoRA paper's shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int


# hidden / layers / heads / MLP from the ReLoRA paper (Lialin et al. 2023, table 9); "tiny" is ours, sized for a
# CPU run of a few minutes.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(256, 4, 4, 704),
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
    """A fresh fp32 LlamaForCausalLM (or the one in cfg.init_from). device="meta" allocates nothing."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.init_from:
        return AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32).to(device)
    config = llama_config(cfg, vocab_size, seq_len, eos_id=eos_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


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


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give every tensor still on the meta device storage on `device`, initialised as in a fresh model.

    With a model built on the meta device, the ReLoRA conversion materializes and quantizes the big
    linears one at a time (`add_adapters`); this does the rest (embeddings, norms, head, rotary tables), so
    a model never exists in fp32 as a whole: a 7B model is built straight into a 24 GB card."""
    std = model.config.initializer_range
    for name, module in list(model.named_modules()):
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in own):
            continue
        if hasattr(module, "inv_freq"):  # rotary tables are computed from the config, not drawn
            parent, child = name.rsplit(".", 1)
            with torch.device(device):
                setattr(model.get_submodule(parent), child, type(module)(config=model.config))
        else:
            module.to_empty(device=device, recurse=False)
            init_module(module, std)
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
